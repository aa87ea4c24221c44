"""Ablate PPO: train named variants from the same SFT and reward model over several seeds,
evaluate each on held-out prompts, and tabulate mean ± sd.

    python -m nanorlhf.ablate --sft runs/demo/sft-merged --rm runs/demo/rm-merged \\
        --data data/demo/ppo.jsonl --eval_data data/demo/test.jsonl --output_dir runs/ablate \\
        --seeds 1,2,3 --variants baseline,no_kl,rloo -- --num_updates 20 --learning_rate 3e-4

Everything after `--` goes to every train_ppo.py run (a variant's own flags come last and win).
Each run trains into output_dir/VARIANT/seed-S (log: train.log), is evaluated greedily with
nanorlhf.evaluate against the SFT model (eval/), and then writes result.json, last and atomically:
a run that has it is reused, so an interrupted grid picks up where it stopped. At the end:
results.md and results.json (mean ± sd over seeds) and curves.png (learning curves, seed mean).

--jobs N runs N cells at once (each its own processes; give each one thread: OMP_NUM_THREADS=1).
--patch NAME=FILE.diff adds a variant NAME: the defaults, trained by a copy of this checkout's code with
FILE applied (git apply), so a change to nanorlhf/ppo.py or train_ppo.py is measured like a flag; the
checkout itself is never touched (docs/exercises.md's deliberate bug is one).
--eval_checkpoints also evaluates every checkpoint a run saved (train with --save_steps K
--save_total_limit 0) and the SFT model as step 0, and draws overoptimization.png: RM score and gold
score against KL to SFT along each run, the picture of Gao et al. 2022 ("Scaling laws for reward model
overoptimization"): where chasing the RM stops helping the gold score.
"""

import concurrent.futures
import glob
import hashlib
import json
import os
import shutil
import statistics
import shlex
import subprocess
import sys
import tempfile
import time

from nanorlhf import plots
from nanorlhf.args import ArgumentParser
from nanorlhf.errors import Interrupted, UserError, run_main
from nanorlhf.evaluate import MAX_NEW_TOKENS
from nanorlhf.files import atomic_write_text
from nanorlhf.loading import check_model_dir
from nanorlhf.metrics import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant changes one thing from train_ppo.py's defaults (the baseline). train_ppo's
# --batch_size counts responses, so rloo/grpo (4 samples of batch_size/4 prompts) see as many
# responses per iteration as the others.
VARIANTS = {
    "baseline": [],
    "no_kl": ["--kl_coef", "0"],
    "kl_0.2": ["--kl_coef", "0.2"],  # four times the default: the leash of the over-optimisation picture
    "k3": ["--kl_estimator", "k3"],
    "no_whiten_adv": ["--no-whiten_advantages"],
    "no_value_clip": ["--cliprange_value", "0"],
    "lambda_1": ["--lam", "1.0"],
    "lambda_0": ["--lam", "0.0"],  # one-step TD: the advantage is r_t + V(s_t+1) - V(s_t)
    "no_clip": ["--cliprange", "1e6"],  # no ratio reaches 1e6: the surrogate is never clipped
    "epochs_1": ["--ppo_epochs", "1"],
    "clamp_stop": ["--clamp_stop_advantage"],  # a bad answer's blame kept off its EOS token (docs/demo.md)
    # the README's first demo's length hack: a cap inside the normal answer length, and nothing lost by a cut
    "no_eos_penalty_48": ["--missing_eos_penalty", "0", "--response_length", "48"],
    "reinforce": ["--advantage_estimator", "reinforce"],
    "rloo": ["--advantage_estimator", "rloo", "--num_samples_per_prompt", "4"],
    "grpo": ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "4"],
    # PPO trained on the gold rubric instead of the RM (x10: the RM's scale); the RM is still loaded, so the
    # critic starts as it does in the baseline
    "ppo_gold": ["--rm_weight", "0", "--reward_fn", "nanorlhf.rewards:gold", "--reward_fn_weight", "10"],
}
# The DPO family: train_dpo.py from the same SFT model on the RM's preference pairs (--pairs), with
# --dpo_args; no reward model, no sampling.
DPO_VARIANTS = {
    "dpo": [],
    "simpo": ["--loss_type", "simpo"],
    "ipo": ["--loss_type", "ipo"],
    "orpo": ["--loss_type", "orpo"],
}
# What the table reports: evaluate.py's results for the final policy, and the training wall time
# (of the train_ppo.py process, startup included; a resumed run counts only the part after resuming).
COLUMNS = ["rm_score", "gold", "ended", "no_repeat", "kl_to_sft", "response_length", "distinct_2", "wall_s"]
CURVES = ["objective/scores", "objective/kl"]
# What --eval_checkpoints records of each checkpoint, and what overoptimization.png draws against kl_to_sft.
TRAJECTORY = ["kl_to_sft", "rm_score", "gold", "ended", "response_length"]


def write_json(path, value):
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def run_logged(argv, log_path, what):
    """Run a command with its output in log_path; returns (exit status, seconds, last log line)."""
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = run_command(argv, log)
    with open(log_path, encoding="utf-8") as log:
        lines = [line.strip() for line in log if line.strip()]
    last = lines[-1] if lines else ""
    if rc not in (0, 3):  # 3 = training diverged: a result, recorded; anything else stops the grid
        raise UserError(f"{what} failed (exit {rc}): {last} (log: {log_path})")
    return rc, time.time() - start, last


def run_command(argv, log):
    """Run argv, a fresh interpreter, with its output in the open file `log`; its exit status. (The tests swap in
    forks of a process that imported torch once: most of a tiny run is its imports.)"""
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint and stop
        child.wait()
        raise


def variant_flags(args, extra, variant):
    """The flags a variant's training run gets: the grid's shared ones, then its own (which win)."""
    if variant in DPO_VARIANTS:
        return shlex.split(args.dpo_args) + DPO_VARIANTS[variant]
    return extra + VARIANTS.get(variant, [])  # a --patch variant: the defaults, by patched code


def train_and_evaluate(args, extra, variant, seed, run_dir, code=ROOT, patch=None):
    """One cell of the grid: train_ppo.py (train_dpo.py for the DPO family) from the checkout `code` (for a
    --patch variant a patched copy, and `patch` names the diff), then evaluate.py; returns its result (also
    result.json)."""
    os.makedirs(run_dir, exist_ok=True)
    flags = variant_flags(args, extra, variant)
    if variant in DPO_VARIANTS:
        train = [sys.executable, os.path.join(code, "train_dpo.py"), "--model", args.sft, "--data", args.pairs,
                 "--output_dir", run_dir, "--seed", str(seed), *flags]
    else:
        train = [sys.executable, os.path.join(code, "train_ppo.py"), "--sft", args.sft, "--rm", args.rm,
                 "--data", args.data, "--output_dir", run_dir, "--seed", str(seed), *flags]
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        train.append("--resume")  # an interrupted run continues from its last checkpoint (if any)
    rc, wall_s, last = run_logged(train, os.path.join(run_dir, "train.log"),
                                  f"{variant} seed {seed}: {os.path.basename(train[1])}")
    result = {"variant": variant, "seed": seed, "flags": flags, **({"patch": patch} if patch else {}),
              "wall_s": wall_s, **budget(run_dir, variant)}
    if rc == 3:
        result["diverged"] = last
    else:
        # the final policy, and with --eval_checkpoints the SFT model (step 0) and every checkpoint before it
        models = [f"{variant}={run_dir}"]
        if args.eval_checkpoints:
            models = ["step-0=" + args.sft] + [f"step-{step}={path}" for step, path in checkpoints(run_dir)] + models
        evaluate = [sys.executable, "-m", "nanorlhf.evaluate", *models, "--ref", args.sft,
                    "--rm", args.rm, "--data", args.eval_data, "--world", args.world,
                    "--output_dir", os.path.join(run_dir, "eval"),
                    "--max_new_tokens", str(args.eval_max_new_tokens), "--seed", str(seed)]
        run_logged(evaluate, os.path.join(run_dir, "eval.log"), f"{variant} seed {seed}: evaluate")
        with open(os.path.join(run_dir, "eval", "results.json"), encoding="utf-8") as f:
            evaluated = json.load(f)
        for row in evaluated:
            row["kl_to_sft"] = row.pop("kl_to_ref")
        result.update({k: v for k, v in evaluated[-1].items() if k not in ("model", "n")})
        if args.eval_checkpoints:
            last_step = plots.read_metrics(run_dir)[-1]["step"]
            result["checkpoints"] = [{"step": int(row["model"][len("step-"):]) if row["model"].startswith("step-")
                                      else last_step, **{k: row[k] for k in TRAJECTORY if k in row}}
                                     for row in evaluated]
    write_json(os.path.join(run_dir, "result.json"), result)  # the marker: written last
    return result


def patched_copy(patch, dest):
    """A copy of this checkout's code in dest (the stage scripts, nanorlhf/, tests/, pyproject.toml; the
    working tree, uncommitted edits included) with the diff `patch` applied by git apply. The checkout is
    never touched. A script run from dest imports dest's nanorlhf (its own folder comes first on sys.path),
    and `python -m pytest` run in dest tests it. Returns dest."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "pyproject.toml":
            shutil.copy2(os.path.join(ROOT, name), dest)
    for folder in ("nanorlhf", "tests"):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(dest, folder),
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    # outside any repository (no search above dest), git apply patches the files in dest like patch(1)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": os.path.dirname(os.path.abspath(dest))}
    try:
        proc = subprocess.run(["git", "apply", "--verbose", os.path.abspath(patch)], cwd=dest, env=env,
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("--patch needs git (git apply) on the PATH") from None
    if proc.returncode:
        first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
        raise UserError(f"{patch}: does not apply to this checkout's code: {first}")
    return dest


def checkpoints(run_dir):
    """[(step, path)] of the checkpoint-STEP dirs a run kept, oldest first."""
    found = [(int(p.rsplit("-", 1)[1]), p) for p in glob.glob(os.path.join(run_dir, "checkpoint-*"))
             if p.rsplit("-", 1)[1].isdigit()]
    return sorted(found)


def budget(run_dir, variant):
    """What a run consumed, from its metrics.jsonl: responses sampled (PPO family) or preference pairs
    seen (DPO family)."""
    last = plots.read_metrics(run_dir)[-1]
    name = "pairs" if variant in DPO_VARIANTS else "episodes"
    return {"budget": f"{last[name]:.0f} {'pairs' if name == 'pairs' else 'responses'}"} if name in last else {}


def summarize(variant, results, patch=None):
    """Mean and sd over the seeds that finished (sd None with one seed)."""
    flags = DPO_VARIANTS[variant] if variant in DPO_VARIANTS else VARIANTS.get(variant, [])
    flags = f"patch {os.path.basename(patch)}" if patch else " ".join(flags) or "(defaults)"
    row = {"variant": variant, "flags": flags,
           "seeds": len(results), "diverged": sum("diverged" in r for r in results),
           "budget": results[0].get("budget", "") if results else ""}
    for col in COLUMNS:
        values = [r[col] for r in results if col in r]
        if values:
            row[col] = statistics.mean(values)
            row[col + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def markdown_table(rows):
    lines = ["| variant | flags | " + " | ".join(COLUMNS) + " | seeds | budget |",
             "|" + "---|" * (len(COLUMNS) + 4)]
    for row in rows:
        cells = [("–" if c not in row else f"{row[c]:.3f}" if row[c + "_sd"] is None
                  else f"{row[c]:.3f} ± {row[c + '_sd']:.3f}") for c in COLUMNS]
        seeds = f"{row['seeds']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append(f"| {row['variant']} | `{row['flags']}` | " + " | ".join(cells)
                     + f" | {seeds} | {row['budget']} |")
    return "\n".join(lines)


def mean_curve(runs_rows, keys=CURVES):
    """The seed mean of each curve (keys), at the steps every seed logged."""
    by_step = [{r["step"]: r for r in rows} for rows in runs_rows if rows]
    steps = sorted(set.intersection(*(set(d) for d in by_step))) if by_step else []
    return [{"step": s, **{k: statistics.mean(d[s][k] for d in by_step) for k in keys
                          if all(k in d[s] for d in by_step)}} for s in steps]


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="variants: " + ", ".join(VARIANTS))
    parser.add_argument("--sft", required=True, help="the SFT policy (a merged model dir)")
    parser.add_argument("--rm", required=True, help="the reward model (a merged RM dir)")
    parser.add_argument("--data", required=True, help="PPO training prompts")
    parser.add_argument("--eval_data", default="data/demo/test.jsonl", help="held-out prompts")
    parser.add_argument("--output_dir", default="runs/ablate")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--world", default=os.path.join(ROOT, "data", "demo", "world.json"),
                        help="the demo world, for the gold rubric")
    parser.add_argument("--eval_max_new_tokens", type=int, default=MAX_NEW_TOKENS, range=">0",
                        help="room to end in evaluation (evaluate.py's default)")
    parser.add_argument("--pairs", default="data/demo/rm.jsonl", help="preference pairs (the DPO family)")
    parser.add_argument("--dpo_args", default="", help="flags for every train_dpo.py run, as one string")
    parser.add_argument("--jobs", type=int, default=1, range=">0",
                        help="cells run at once (each with its own processes)")
    parser.add_argument("--eval_checkpoints", action="store_true",
                        help="also evaluate the SFT model and each run's checkpoints: overoptimization.png")
    parser.add_argument("--patch", action="append", default=[], metavar="NAME=FILE.diff",
                        help="a variant NAME (list it in --variants): the defaults, trained by a copy of this "
                        "checkout's code with FILE applied (git apply); repeatable")
    return parser


def patch_id(path):
    """A diff named by its file name and content: a run is reused only by the same change."""
    with open(path, "rb") as f:
        return f"{os.path.basename(path)} (sha256 {hashlib.sha256(f.read()).hexdigest()[:12]})"


def parse_patches(specs):
    """--patch NAME=FILE, ... -> {NAME: FILE}, each a new variant name and a file that exists."""
    patches = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--patch: expected NAME=FILE.diff, got {spec!r}")
        if name in VARIANTS or name in DPO_VARIANTS or name in patches:
            raise UserError(f"--patch {spec}: {name} is already a variant; choose another name")
        if not os.path.isfile(path):
            raise UserError(f"--patch {spec}: {path}: no such file")
        patches[name] = path
    return patches


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    patches = parse_patches(args.patch)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS and v not in DPO_VARIANTS and v not in patches]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {unknown}; choose from {', '.join([*VARIANTS, *DPO_VARIANTS])}"
                        + (f" or a --patch name ({', '.join(patches)})" if patches else ""))
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    check_model_dir(args.sft, "--sft")
    check_model_dir(args.rm, "--rm")
    for path in args.data.split(",") + args.eval_data.split(","):
        if not os.path.exists(path):  # a file, or a directory of them
            raise UserError(f"{path}: no such file (--data / --eval_data)")
    if not os.path.isfile(os.path.join(ROOT, "train_ppo.py")):
        raise UserError(f"{ROOT}: no train_ppo.py; run the ablation from a nanorlhf checkout")
    args.sft, args.rm = os.path.abspath(args.sft), os.path.abspath(args.rm)
    os.makedirs(args.output_dir, exist_ok=True)

    cells = [(v, s) for v in variants for s in seeds]
    done, todo = {}, []
    for i, (variant, seed) in enumerate(cells, 1):
        run_dir = os.path.join(args.output_dir, variant, f"seed-{seed}")
        marker = os.path.join(run_dir, "result.json")
        if not os.path.isfile(marker):
            todo.append((variant, seed, run_dir))
            continue
        with open(marker, encoding="utf-8") as f:
            done[variant, seed] = json.load(f)
        if done[variant, seed]["flags"] != variant_flags(args, extra, variant):
            raise UserError(f"{run_dir}: ran with other flags ({' '.join(done[variant, seed]['flags'])}); "
                            "choose another --output_dir")
        if done[variant, seed].get("patch") != (patch_id(patches[variant]) if variant in patches else None):
            raise UserError(f"{run_dir}: ran with other code ({done[variant, seed].get('patch', 'unpatched')}); "
                            "choose another --output_dir")
        if args.eval_checkpoints and not ({"checkpoints", "diverged"} & set(done[variant, seed])):
            raise UserError(f"{run_dir}: evaluated without --eval_checkpoints; choose another --output_dir")
        info(f"[{i}/{len(cells)}] {variant} seed {seed}: reused (finished before)")

    # each --patch variant still to train: one patched copy of the code, for as long as the grid runs
    scratch = tempfile.TemporaryDirectory(prefix="nanorlhf-patched-")
    code = {v: patched_copy(patches[v], os.path.join(scratch.name, v)) for v in dict.fromkeys(v for v, _, _ in todo)
            if v in patches}

    def cell(variant, seed, run_dir):
        info(f"{variant} seed {seed}: training ..." + (f" (patched: {patches[variant]})" if variant in code else ""))
        return train_and_evaluate(args, extra, variant, seed, run_dir, code.get(variant, ROOT),
                                  patch_id(patches[variant]) if variant in patches else None)

    # --jobs cells at once, each in its own processes (threads here only wait for them)
    with scratch, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        running = {pool.submit(cell, *job): job[:2] for job in todo}
        try:
            for future in concurrent.futures.as_completed(running):
                result = done[running[future]] = future.result()
                outcome = (f"diverged: {result['diverged']}" if "diverged" in result
                           else f"rm_score {result['rm_score']:.3f}, {result['wall_s']:.0f} s")
                info(f"[{len(done)}/{len(cells)}] {result['variant']} seed {result['seed']}: {outcome}")
        except KeyboardInterrupt:  # the children got Ctrl-C too: they save a checkpoint and stop
            pool.shutdown(wait=True, cancel_futures=True)
            raise Interrupted("stopped; run the same command again to continue") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # let the cells already running finish
            raise
    results = {v: [done[v, s] for s in seeds] for v in variants}

    rows = [summarize(v, results[v], patches.get(v)) for v in variants]
    table = markdown_table(rows)
    flags = f"train_ppo.py `{' '.join(extra) or '-'}`" + (
        f", train_dpo.py `{args.dpo_args}`" if any(v in DPO_VARIANTS for v in variants) else "")
    atomic_write_text(os.path.join(args.output_dir, "results.md"),
                      f"Mean ± sd over seeds {args.seeds}; shared flags: {flags}\n\n{table}\n")
    write_json(os.path.join(args.output_dir, "results.json"),
               {"summary": rows, "runs": [r for v in variants for r in results[v]], "extra_flags": extra})
    run_dirs = {v: [os.path.join(args.output_dir, v, f"seed-{s}") for s in seeds] for v in variants}
    curves = {v: mean_curve([plots.read_metrics(d) for d in dirs if os.path.isfile(os.path.join(d, "metrics.jsonl"))])
              for v, dirs in run_dirs.items()}
    plots.plot(curves, os.path.join(args.output_dir, "curves.png"), CURVES, title="seed mean")
    # each run's gold score against how far it moved from the SFT model: the judge beside the price
    plots.scatter({v: [(r["kl_to_sft"], r["gold"]) for r in results[v] if "gold" in r] for v in variants},
                  os.path.join(args.output_dir, "gold_vs_kl.png"), "KL to SFT (nats per answer)",
                  "gold rubric (held-out, greedy)", title="each point: one seed", xscale="symlog")
    if args.eval_checkpoints:
        plots.trajectories({v: [r["checkpoints"] for r in results[v] if "checkpoints" in r] for v in variants},
                           os.path.join(args.output_dir, "overoptimization.png"), "kl_to_sft",
                           {"rm_score": "reward model score (the proxy)", "gold": "gold rubric (the judge)"},
                           xlabel="KL to SFT (nats per answer, held-out, greedy)",
                           title="each line: one run, a point per checkpoint (step 0 = SFT)")
    print(table)


if __name__ == "__main__":
    run_main(main)
