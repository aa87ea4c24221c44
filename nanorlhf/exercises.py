"""The exercises of docs/exercises.md: change one thing in PPO, predict what happens, measure it.

    python -m nanorlhf.exercises no_clip --seeds 1            # one exercise, one seed: a few minutes
    python -m nanorlhf.exercises --page docs/exercises.md     # all of them, seeds 1,2,3 (make exercises)

Each exercise trains its variants and the baseline with nanorlhf.ablate (the command is printed) from the
demo's SFT and reward model, with make ablate's flags and its own number of iterations, and evaluates
each final policy on the held-out prompts with the gold rubric. Finished runs are reused, so the baseline
trains once per seed and an interrupted run picks up where it stopped. A patched exercise trains a copy
of the code with its diff applied (ablate --patch) and also runs its tests on that copy.

--page FILE writes each measured answer between FILE's `<!-- measured:NAME -->` and
`<!-- /measured:NAME -->` lines: a table (mean and range over the seeds), the columns where the variant's
seed range and the baseline's do not overlap, and for a patched exercise the tests that failed. Flags
after `--` go to every train_ppo.py run and win over the shared ones (the tests run one iteration each).
"""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from nanorlhf import ablate, plots
from nanorlhf.args import ArgumentParser
from nanorlhf.errors import UserError, run_main
from nanorlhf.evaluate import MAX_NEW_TOKENS
from nanorlhf.files import atomic_write_text
from nanorlhf.metrics import info

ROOT = ablate.ROOT
# make ablate's flags: 16 responses per iteration, room to end (96 tokens), a cut answer loses 5
SHARED = ["--batch_size", "16", "--learning_rate", "3e-4", "--logging_steps", "1", "--response_length", "96",
          "--missing_eos_penalty", "5"]
BUG_DIFF = "docs/bug_padding_in_policy_loss.diff"
# name: the variants it trains beside the baseline (ablate presets, or NAME=DIFF for a patched copy), the
# PPO iterations, and what the training log adds to the table (mean over the second half of the iterations)
EXERCISES = {
    "no_clip": {"variants": ["no_clip"], "updates": 10, "logged": ["policy/clipfrac_avg", "policy/approxkl_avg"]},
    "epochs_1": {"variants": ["epochs_1"], "updates": 10, "logged": ["policy/approxkl_avg"]},
    "no_whiten_adv": {"variants": ["no_whiten_adv"], "updates": 10, "logged": ["policy/approxkl_avg"]},
    "lambda": {"variants": ["lambda_0", "lambda_1"], "updates": 10, "logged": ["val/explained_variance"]},
    "critic_free": {"variants": ["rloo"], "updates": 10, "logged": ["objective/scores"]},
    "length_hack": {"variants": ["no_eos_penalty_48"], "updates": 10,
                    "logged": ["val/eos_fraction", "val/response_length"]},
    "no_kl_long": {"variants": ["no_kl"], "updates": 40, "logged": ["objective/kl", "objective/scores"]},
    "padding_bug": {"variants": [f"padding_bug={BUG_DIFF}"], "updates": 10, "logged": ["policy/approxkl_avg"],
                    "tests": "tests/test_ppo_math.py"},
}
# the held-out columns of every table (ablate's result.json), then the training time
COLUMNS = {"gold": "gold", "ended": "ended", "no_repeat": "no_repeat", "kl_to_sft": "KL to SFT",
           "response_length": "length", "rm_score": "RM score", "wall_s": "train s"}
LOGGED = {"policy/clipfrac_avg": "clipfrac", "policy/approxkl_avg": "approxkl",
          "val/explained_variance": "explained var", "val/eos_fraction": "ended (train)",
          "val/response_length": "length (train)", "objective/scores": "score (train)",
          "objective/kl": "KL (train)"}


def variant_name(variant):
    return variant.partition("=")[0]


def group_dir(output_dir, updates):
    return os.path.join(output_dir, f"{updates}-iterations")


def run_group(args, extra, updates, exercises):
    """One ablate grid: the baseline and every variant of the exercises that train for `updates` iterations."""
    variants = ["baseline"] + list(dict.fromkeys(v for name in exercises for v in EXERCISES[name]["variants"]))
    argv = ["--sft", args.sft, "--rm", args.rm, "--data", args.data, "--eval_data", args.eval_data,
            "--output_dir", group_dir(args.output_dir, updates), "--seeds", args.seeds,
            "--variants", ",".join(map(variant_name, variants)), "--jobs", str(args.jobs),
            "--eval_max_new_tokens", str(args.eval_max_new_tokens),
            *[f"--patch={variant_name(v)}={os.path.join(ROOT, v.partition('=')[2])}" for v in variants if "=" in v],
            "--", *SHARED, "--num_updates", str(updates), *extra]
    info("python -m nanorlhf.ablate " + " ".join(argv))
    ablate.main(argv)


def failing_tests(diff, test_file):
    """Run test_file on a copy of the code with diff applied: (summary line, names of the failed tests)."""
    with tempfile.TemporaryDirectory(prefix="nanorlhf-patched-") as scratch:
        code = ablate.patched_copy(diff, os.path.join(scratch, "code"))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                              cwd=code, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    failed = re.findall(r"^FAILED \S+::(\S+)", proc.stdout, flags=re.M)
    summary = proc.stdout.strip().splitlines()[-1].strip("= ") if proc.stdout.strip() else proc.stderr.strip()
    summary = re.sub(r" in [\d.]+s( \(.*\))?$", "", summary)  # the counts, not the time
    return summary, failed


def seed_runs(args, updates, variant):
    """[(result.json, metrics.jsonl rows)] of a variant's runs, one per seed."""
    runs = []
    for seed in args.seeds.split(","):
        run_dir = os.path.join(group_dir(args.output_dir, updates), variant, f"seed-{seed}")
        with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
            runs.append((json.load(f), plots.read_metrics(run_dir)))
    return runs


def seed_values(runs, key):
    """One value per seed that has it: a result.json column, or a logged metric's mean over the second half
    of the iterations."""
    if key in COLUMNS:
        return [result[key] for result, _ in runs if key in result]
    late = [[r[key] for r in rows if r["step"] > rows[-1]["step"] / 2 and key in r] for _, rows in runs]
    return [statistics.mean(values) for values in late if values]


def cell(values):
    if not values:
        return "–"
    digits = 1 if abs(statistics.mean(values)) >= 10 else 3
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f} – {max(values):.{digits}f})"


def answer(args, name):
    """The measured block of one exercise: the table, then the columns whose seed ranges do not overlap the
    baseline's, then (a patched exercise) what its tests said."""
    exercise = EXERCISES[name]
    keys = [*COLUMNS, *exercise["logged"]]
    variants = ["baseline"] + [variant_name(v) for v in exercise["variants"]]
    runs = {v: seed_runs(args, exercise["updates"], v) for v in variants}
    values = {v: {k: seed_values(runs[v], k) for k in keys} for v in variants}
    seeds = args.seeds.split(",")
    iterations = runs["baseline"][0][1][-1]["step"]  # as trained (flags after -- may change the count)
    lines = [(f"Mean (min – max) over seeds {', '.join(seeds)}" if len(seeds) > 1 else f"Seed {seeds[0]}")
             + f", {iterations} PPO iterations. Held-out greedy answers to {os.path.basename(args.eval_data)} "
             f"({args.eval_max_new_tokens} new tokens), then the training time"
             + (" and, from the training log, the mean over iterations "
                f"{iterations // 2 + 1}-{iterations}" if exercise["logged"] else "") + ":", "",
             "| variant | " + " | ".join(COLUMNS.get(k) or LOGGED[k] for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for v in variants:
        n = sum("diverged" in result for result, _ in runs[v])
        lines.append(f"| {v}" + (f" ({n} of {len(seeds)} diverged)" if n else "") + " | "
                     + " | ".join(cell(values[v][k]) for k in keys) + " |")
    lines.append("")
    for v in variants[1:]:
        if len(seeds) < 2:
            lines.append(f"{v}: one seed, no range to compare with the baseline's.")
            continue
        apart = []
        for k in keys:
            mine, base = values[v][k], values["baseline"][k]
            if mine and base and (min(mine) > max(base) or max(mine) < min(base)):
                apart.append(f"{COLUMNS.get(k) or LOGGED[k]} {'higher' if min(mine) > max(base) else 'lower'} "
                             f"({cell([statistics.mean(mine)])} against {cell([statistics.mean(base)])})")
        lines.append(f"{v} against the baseline, seed ranges apart: " + ("; ".join(apart) if apart else
                     "none (every column's range overlaps the baseline's: no difference these seeds can show)")
                     + ".")
    if "tests" in exercise:
        summary, failed = failing_tests(os.path.join(ROOT, BUG_DIFF), exercise["tests"])
        lines += ["", f"`python -m pytest {exercise['tests']}` on the patched copy: {summary}"
                  + (". Failed: " + ", ".join(f"`{t}`" for t in failed) if failed else "") + "."]
    return "\n".join(lines)


def fill(page_text, name, block):
    """page_text with the lines between <!-- measured:NAME --> and <!-- /measured:NAME --> replaced by block."""
    pattern = re.compile(rf"(<!-- measured:{re.escape(name)} -->\n).*?(\n<!-- /measured:{re.escape(name)} -->)",
                         flags=re.S)
    if not pattern.search(page_text):
        raise UserError(f"--page: no <!-- measured:{name} --> ... <!-- /measured:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + block + m.group(2), page_text)


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog="exercises: " + ", ".join(EXERCISES))
    parser.add_argument("exercises", nargs="*", help="which to run (default: all)")
    parser.add_argument("--sft", default="runs/demo/sft-merged", help="the SFT policy (make demo's)")
    parser.add_argument("--rm", default="runs/demo/rm-merged", help="the reward model (make demo's)")
    parser.add_argument("--data", default="data/demo/ppo.jsonl", help="PPO training prompts")
    parser.add_argument("--eval_data", default="data/demo/test.jsonl", help="held-out prompts")
    parser.add_argument("--output_dir", default="runs/exercises")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=2, range=">0", help="runs at once (one thread each)")
    parser.add_argument("--eval_max_new_tokens", type=int, default=MAX_NEW_TOKENS, range=">0",
                        help="room to end in evaluation")
    parser.add_argument("--page", default="", help="write the measured answers into this page's marked blocks")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    names = args.exercises or list(EXERCISES)
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise UserError(f"unknown exercise {', '.join(unknown)}; choose from {', '.join(EXERCISES)}")
    if args.page and not os.path.isfile(args.page):
        raise UserError(f"--page {args.page}: no such file")
    # one thread per run: float sums depend on the thread count, and the page's numbers were measured so
    os.environ["OMP_NUM_THREADS"] = "1"
    start = time.time()
    for updates in sorted({EXERCISES[n]["updates"] for n in names}, reverse=True):  # the longest runs first
        run_group(args, extra, updates, [n for n in names if EXERCISES[n]["updates"] == updates])
    blocks = {name: answer(args, name) for name in names}
    for name, block in blocks.items():
        print(f"\n## {name}\n\n{block}")
    wall = time.time() - start
    info(f"{len(names)} exercises in {wall // 60:.0f} min {wall % 60:.0f} s")
    if args.page:
        with open(args.page, encoding="utf-8") as f:
            text = f.read()
        for name, block in blocks.items():
            text = fill(text, name, block)
        if set(names) == set(EXERCISES):
            text = fill(text, "run", f"Measured by `python -m nanorlhf.exercises {shlex.join(argv)}` "
                        f"in {wall // 60:.0f} min {wall % 60:.0f} s on {os.cpu_count()} CPU cores "
                        f"(--jobs {args.jobs}, one thread each; runs finished before are reused, not timed).")
        atomic_write_text(args.page, text)
        info(f"wrote the measured answers into {args.page}")


if __name__ == "__main__":
    run_main(main)
