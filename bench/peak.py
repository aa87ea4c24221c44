"""Run a Python script as __main__ and record its peak memory, whatever way it exits.

    BENCH_PEAK_JSON=peak.json [BENCH_CLOCK=cpu] python bench/peak.py train_ppo.py --sft ... --rm ...

Each side of the benchmark runs in its own fresh process through this wrapper, so the peak is that
side's alone: the process's maximum resident set size (getrusage(RUSAGE_SELF).ru_maxrss, which is
what the parent would read as RUSAGE_CHILDREN after waiting for it) and, on CUDA, the most GPU
memory PyTorch ever had allocated.

BENCH_CLOCK=cpu makes time.time and time.perf_counter count this process's CPU seconds instead of
wall-clock seconds, so the script's own timings (train_ppo.py's time/rollout_s...) measure the work
it did, not the time other processes held the CPU. For a single-threaded process on a CPU that is
what its wall clock would read on an idle machine; it is meaningless on CUDA (kernels run async).
"""

import json
import os
import resource
import runpy
import sys
import time


def peak_memory():
    peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def main():
    script, out = sys.argv[1], os.environ["BENCH_PEAK_JSON"]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as if the script had been run itself
    if os.environ.get("BENCH_CLOCK") == "cpu":
        time.time = time.perf_counter = time.process_time
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as f:
            json.dump(peak_memory(), f)


if __name__ == "__main__":
    main()
