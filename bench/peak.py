"""Run a Python script as __main__ and record its memory, whatever way it exits.

    BENCH_PEAK_JSON=peak.json [BENCH_CLOCK=cpu] [BENCH_MARKER=path] [BENCH_STOP_P=p BENCH_STOP_IDS=i,j]
        python bench/peak.py train_ppo.py --sft ... --rm ...

Each side of the benchmark runs in its own fresh process through this wrapper, so what it records is
that side's alone:
  - rss_mb: the process's maximum resident set size (getrusage), loading included;
  - on Linux, sampled from /proc/self/status every 50 ms: the anonymous memory (the process's own
    tensors) and the file pages it maps (a safetensors checkpoint read by mmap), as the working set
    during training (the largest anon + file after BENCH_MARKER appears: the models are loaded) and
    as loading's transient peak (the largest before). ru_maxrss is kept too, but a child inherits
    its parent's at exec on Linux, so it overstates a process started by a big one;
  - on CUDA, the most GPU memory PyTorch ever had allocated.
A watchdog stops the run (exit 137, "memory" in the JSON) before the machine runs out of memory.

BENCH_CLOCK=cpu makes time.time and time.perf_counter count this process's CPU seconds instead of
wall-clock seconds, so the script's own timings (train_ppo.py's time/rollout_s...) measure the work
it did, not the time other processes held the CPU. For a single-threaded process on a CPU that is
what its wall clock would read on an idle machine; it is meaningless on CUDA (kernels run async).

BENCH_STOP_P / BENCH_STOP_IDS give both sides of the benchmark the same stopping behaviour, whatever
the (random) weights: a hook on every causal LM's output layer sets the first stop id's probability
to exactly p at every position and the others' to 0 (p = 0: responses never end, all are full length;
p = 1/24: they end at varying lengths, 24 tokens on average, as real answers do).
"""

import json
import math
import os
import resource
import runpy
import sys
import threading
import time

SAMPLE_S = 0.05
MIN_AVAILABLE_MB = 1500  # the watchdog stops the run when the machine has less than this left


def read_status():
    """(anonymous MB, file-mapped MB) of this process, from /proc/self/status (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0) + fields.get("RssShmem", 0.0)


def available_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf


class Sampler(threading.Thread):
    def __init__(self, marker, out):
        super().__init__(daemon=True)
        self.marker, self.out, self.stats, self.stopped_for_memory = marker, out, {}, None
        self.t0 = time.time()
        path = os.environ.get("BENCH_TIMELINE")  # every sample: seconds, anon MB, mapped MB, phase
        self.timeline = open(path, "w", buffering=1) if path else None

    def run(self):
        while True:
            try:
                anon, mapped = read_status()
            except OSError:
                return
            phase = "train" if self.marker and os.path.exists(self.marker) else "load"
            if self.timeline:
                self.timeline.write(f"{time.time() - self.t0:.2f} {anon:.0f} {mapped:.0f} {phase}\n")
            best = self.stats.get(phase)
            if best is None or anon + mapped > best[0] + best[1]:
                self.stats[phase] = (anon, mapped)
            if available_mb() < MIN_AVAILABLE_MB:
                self.stopped_for_memory = f"stopped at {anon + mapped:.0f} MB: the machine was about to run out"
                with open(self.out, "w") as f:
                    json.dump(result(self), f)
                os._exit(137)
            time.sleep(SAMPLE_S)


def install_stop_bias(p, stop_ids, temperature):
    """Every causal LM loaded from now on gets the output hook described in the module docstring. The
    probability is p after the sampling temperature (the stop logit is set in temperature units)."""
    import torch
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained.__func__
    log_odds = math.log(p / (1 - p)) if p > 0 else -math.inf

    def hook(module, inputs, logits):
        logits = logits.clone()
        if p > 0:
            others = logits.float().index_fill(-1, torch.tensor(stop_ids, device=logits.device), -math.inf)
            stop = temperature * (torch.logsumexp(others / temperature, -1) + log_odds)
            logits[..., stop_ids[0]] = stop.to(logits.dtype)
            logits[..., stop_ids[1:]] = -math.inf
        else:
            logits[..., stop_ids] = -math.inf
        return logits

    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        model.get_output_embeddings().register_forward_hook(hook)
        return model

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


def result(sampler):
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    for phase, key in (("train", "working_set"), ("load", "loading_peak")):
        if phase in sampler.stats:
            anon, mapped = sampler.stats[phase]
            out[f"{key}_mb"], out[f"{key}_anon_mb"], out[f"{key}_mapped_mb"] = anon + mapped, anon, mapped
    if sampler.stopped_for_memory:
        out["memory"] = sampler.stopped_for_memory
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    script, out = sys.argv[1], os.environ["BENCH_PEAK_JSON"]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as if the script had been run itself
    if os.environ.get("BENCH_STOP_IDS"):
        install_stop_bias(float(os.environ.get("BENCH_STOP_P", "0")),
                          [int(i) for i in os.environ["BENCH_STOP_IDS"].split(",")],
                          float(os.environ.get("BENCH_STOP_TEMPERATURE", "1")))
    if os.environ.get("BENCH_CLOCK") == "cpu":
        time.time = time.perf_counter = time.process_time
    sampler = Sampler(os.environ.get("BENCH_MARKER"), out)
    if os.path.exists("/proc/self/status"):
        sampler.start()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as f:
            json.dump(result(sampler), f)


if __name__ == "__main__":
    main()
