"""What this machine can do at most, measured: the yardsticks the PPO numbers are read against.

    python bench/machine.py --out machine.json

- matmul GFLOP/s in float32 and bfloat16 (a 2048 x 2048 @ 2048 x 2048 product: 2 * 2048^3 FLOPs),
  the best of several calls: the update's achieved GFLOP/s is compared with the peak of its dtype;
- read bandwidth, GB/s: the sum of a 512 MB tensor (every byte read once). One decode step of a model
  reads every weight once, so weight bytes / this bandwidth is the fastest a memory-bound sampler can
  go; and copy bandwidth (bytes copied per second, one 512 MB tensor into another), for reference.
Run with the benchmark's thread count (bench/run.py sets OMP_NUM_THREADS).
"""

import argparse
import json
import time

import torch


def best_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype, n=2048, repeats=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeats) / 1e9


def bandwidth_gb_s(megabytes=512, repeats=5):
    """(read GB/s, copy GB/s) over a megabytes-sized float32 tensor."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    size = src.numel() * 4
    return size / best_seconds(src.sum, repeats) / 1e9, size / best_seconds(lambda: dst.copy_(src), repeats) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    read, copy = bandwidth_gb_s()
    result = {"threads": torch.get_num_threads(), "matmul_gflops_float32": matmul_gflops(torch.float32),
              "matmul_gflops_bfloat16": matmul_gflops(torch.bfloat16), "read_gb_s": read, "copy_gb_s": copy}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
