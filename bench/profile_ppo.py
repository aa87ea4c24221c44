"""Where does a PPO iteration of train_ppo.py spend its time? torch.profiler over a short run.

    python bench/profile_ppo.py --sft runs/bench/small/sft --rm runs/bench/small/rm \
        --data runs/bench/small/prompts.jsonl --output_dir runs/bench/profile --num_updates 3 [--trace t.json]

Takes train_ppo.py's own flags (run `make bench` first to build those models). The building blocks
train_ppo.py calls are wrapped in profiler labels (their behaviour is unchanged), so the table shows
each phase's share: the rollout, the three scoring forwards, the training forwards, backward, the
optimizer. Labels nest (ref_logprobs contains a policy_logits call), so their inclusive times overlap.
"""

import functools
import os
import runpy
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label(module, name, text):
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(text):
            return fn(*args, **kwargs)

    setattr(module, name, wrapped)


def main():
    trace = None
    if "--trace" in sys.argv:
        i = sys.argv.index("--trace")
        trace = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    from nanorlhf import forward, ppo, sampling

    label(sampling, "generate", "1 rollout: generate")
    for name, text in [("reward_scores", "2 score: reward model"), ("logprobs_of", "3 score: reference log-probs"),
                       ("critic_values", "critic values (4 + 7)"), ("policy_logits", "policy logits (3 + 7)")]:
        label(forward, name, text)
    for name, text in [("logprobs_from_logits", "logprobs_from_logits"), ("entropy_from_logits", "7 entropy"),
                       ("compute_gae", "6 compute_gae")]:
        label(ppo, name, text)
    label(torch.Tensor, "backward", "7 backward")
    label(torch.optim.AdamW, "step", "7 optimizer step")

    sys.argv = [os.path.join(ROOT, "train_ppo.py")] + sys.argv[1:]
    sys.path[0] = ROOT
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    events = prof.key_averages()
    print("\nphases (inclusive CPU time over all iterations; see the docstring on nesting):")
    for e in sorted(events, key=lambda e: e.key):
        if e.key[0].isdigit() or e.key.startswith(("critic", "policy", "logprobs")):
            print(f"  {e.key:32s} {e.count:6d} calls  {e.cpu_time_total / 1e6:8.2f} s")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=20))
    if trace:
        prof.export_chrome_trace(trace)
        print(f"chrome trace: {trace} (open in chrome://tracing or https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
