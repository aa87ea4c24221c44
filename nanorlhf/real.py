"""make real: RLHF on a real model, the seeds' pipeline (RM -> PPO) and its alternatives, judged by a program.

    python -m nanorlhf.real --seeds 1                              # make real: one seed of each method
    python -m nanorlhf.real --seeds 1,2,3 --page docs/real.md      # make real-seeds: docs/real.md's tables

From the starting model (--model, SmolLM2-135M-Instruct by `make real-model`) on the arithmetic questions of
data/real/, each seed S runs the seeds' pipeline, SFT -> RM -> PPO, and its alternatives in OUT/seed-S/, one
stage after the other, each timed (logs/STAGE.log):

  sft     train_sft.py on --sft_data (the training questions answered as a teacher would: "23 + 45 = 68"), merged
          into OUT/seed-S/sft: the base every method below starts from (--sft_data "": the starting model is)
  pairs   python -m nanorlhf.pairs: --samples answers to each of --questions training questions from the base,
          judged by --reward_fn; a right answer over a wrong one (pairs/train.jsonl, held out: eval.jsonl)
  rm      train_rm.py, LoRA on the base, on those pairs; its accuracy on the held-out questions' pairs
  ppo     train_ppo.py --sft BASE --rm rm/ (the LoRA reward adapter: one frozen base for all four roles)
  grpo    train_ppo.py --reward_fn accuracy --advantage_estimator grpo: the program's reward, no reward model
  dpo     train_dpo.py on the same pairs
  merge   merge_lora.py: every trained policy as a model dir named by its method, OUT/seed-S/{ppo,grpo,dpo}
  eval    ONE nanorlhf.evaluate call, the starting model first (so KL is to it), greedy, on --eval_data:
          accuracy (right), readable (commits to exactly one number: the format), ended, length, KL

Then OUT/results.md and results.json (the mean and range over the seeds), OUT/curves.png, and with --page the
page's `<!-- measured:NAME -->` blocks (as nanorlhf.exercises fills docs/exercises.md). Accuracy splits into
format x arithmetic: readable is the share of answers a parser can read, arithmetic = accuracy / readable the
share right among them. A stage that finished with the same command is reused (stages.json), so an interrupted
run, or more seeds after `make real`, picks up where it stopped. --STAGE_args "..." flags go last to that
stage's command (and win); the tests run every stage for one iteration that way.
"""

import json
import os
import shlex
import shutil
import statistics
import sys
import time

from nanorlhf import ablate, plots
from nanorlhf.args import ArgumentParser
from nanorlhf.errors import UserError, run_main
from nanorlhf.exercises import cell as seed_cell
from nanorlhf.exercises import fill
from nanorlhf.files import atomic_write_text
from nanorlhf.loading import check_model_dir
from nanorlhf.metrics import info

ROOT = ablate.ROOT
METHODS = {  # name: what it is trained on, from the base (the SFT model, or the starting model without one)
    "ppo": "PPO on the reward model (LoRA RM on its own answers' pairs)",
    "grpo": "GRPO on the program's reward ({judge})",
    "dpo": "DPO on the same pairs",
}
SFT_ROW = "SFT on worked answers (--sft_data)"
JUDGES = ["nanorlhf.rewards:accuracy", "nanorlhf.rewards:readable"]
COLUMNS = {"accuracy": "accuracy", "readable": "format (readable)", "arithmetic": "arithmetic (right / readable)",
           "ended": "ended", "response_length": "length", "kl_to_start": "KL to start", "train_s": "train s"}
CURVES = ["objective/fn_scores", "objective/rm_scores", "objective/kl", "val/eos_fraction", "val/response_length"]


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog="methods: " + ", ".join(METHODS))
    parser.add_argument("--model", default="runs/models/smollm2-135m-instruct",
                        help="the starting model (make real-model converts SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="data/real/arith_train.jsonl", help="training questions {question, answer}")
    parser.add_argument("--eval_data", default="data/real/arith_test.jsonl", help="held-out questions")
    parser.add_argument("--sft_data", default="data/real/arith_sft.jsonl",
                        help="dialogues of the SFT stage every method starts from; \"\" for none (RL from --model)")
    parser.add_argument("--output_dir", default="runs/real")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--methods", default="ppo,grpo,dpo", help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--reward_fn", default="nanorlhf.rewards:accuracy",
                        help="the program that judges: makes the pairs, is GRPO's reward, and a column of the table")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the frozen base while sampling and training: auto is the scripts' own (CPU fp32, CUDA "
                        "bf16); evaluation is always fp32")
    # sizes (see docs/real.md for why these)
    parser.add_argument("--questions", type=int, default=256, range=">0", help="training questions the pairs come from")
    parser.add_argument("--eval_questions", type=int, default=32, range=">=0",
                        help="of those, held out for the reward model's (and DPO's) held-out accuracy")
    parser.add_argument("--samples", type=int, default=4, range=">1", help="answers sampled per question for pairs")
    parser.add_argument("--temperature", type=float, default=0.7, range=">0",
                        help="sampling temperature of the pairs and of PPO's and GRPO's rollouts (train_ppo's default)")
    parser.add_argument("--response_length", type=int, default=32, range=">0",
                        help="longest answer sampled (pairs, PPO, GRPO)")
    parser.add_argument("--iterations", type=int, default=12, range=">0", help="PPO and GRPO iterations")
    parser.add_argument("--batch_size", type=int, default=16, range=">0", help="responses per PPO iteration")
    parser.add_argument("--grpo_batch_size", type=int, default=32, range=">0",
                        help="responses per GRPO iteration (no critic to run or train: about PPO's time at 16)")
    parser.add_argument("--group", type=int, default=8, range=">1", help="GRPO's answers per question")
    parser.add_argument("--eval_max_new_tokens", type=int, default=64, range=">0",
                        help="room to end in evaluation (twice --response_length)")
    for stage in ("pairs", "rm", "ppo", "grpo", "dpo", "sft"):
        parser.add_argument(f"--{stage}_args", default="", help=f"more flags for the {stage} stage, as one string")
    parser.add_argument("--page", default="", help="write the measured blocks into this page")
    return parser


def nonempty(path):
    return os.path.isfile(path) and os.path.getsize(path) > 0


class Stages:
    """A seed's stages, run in order. A stage is reused when stages.json holds its command, its output is there, and
    it finished after every stage it reads from; else its output is removed and it runs (logs/NAME.log), timed."""

    def __init__(self, seed_dir):
        self.dir, self.path, self.done = seed_dir, os.path.join(seed_dir, "stages.json"), {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.done = json.load(f)

    def run(self, name, argv, output, after=()):
        command, record = argv[1:], self.done.get(name, {})  # the command without the interpreter's path
        if (record.get("command") == command and os.path.exists(output)
                and all(self.done.get(a, {}).get("finished", float("inf")) <= record["finished"] for a in after)):
            info(f"{os.path.basename(self.dir)} {name}: reused ({record['wall_s']:.0f} s when it ran)")
            return
        self.done.pop(name, None)
        if os.path.isdir(output):
            shutil.rmtree(output)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        info(f"{os.path.basename(self.dir)} {name}: {shlex.join(command)}")
        rc, wall_s, last = ablate.run_logged(argv, os.path.join(self.dir, "logs", f"{name}.log"), name)
        if rc:
            raise UserError(f"{name}: training diverged ({last}); see {self.dir}/logs/{name}.log")
        self.done[name] = {"command": command, "wall_s": wall_s, "finished": time.time()}
        ablate.write_json(self.path, self.done)
        info(f"{os.path.basename(self.dir)} {name}: {wall_s:.0f} s")


def models(args, methods):
    """The rows of every table: the starting model, the SFT model (where there is an SFT stage), each method."""
    return ["start", *(["sft"] if args.sft_data else []), *methods]


def run_seed(args, seed, methods):
    """Every stage of one seed; returns its result (also OUT/seed-S/result.json)."""
    d = os.path.join(args.output_dir, f"seed-{seed}")
    stages, py, lora = Stages(d), sys.executable, ["--lora_rank", "16", "--lora_alpha", "32"]
    common = ["--seed", str(seed), "--dtype", args.dtype]
    base, after_base = args.model, []  # what every method starts from, and the stage that made it
    if args.sft_data:  # 2 epochs of the worked answers, LoRA r 16 at 2e-4 (docs/real.md: with and without it)
        base, after_base = os.path.join(d, "sft"), ["merge sft"]
        trained = os.path.join(d, "train", "sft")
        stages.run("sft", [py, os.path.join(ROOT, "train_sft.py"), "--model", args.model, "--data", args.sft_data,
                           "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "2e-4",
                           "--logging_steps", "5", *lora, *common, *shlex.split(args.sft_args),
                           "--output_dir", trained], trained)
        stages.run("merge sft", [py, os.path.join(ROOT, "merge_lora.py"), "--base", args.model, "--adapter", trained,
                                 "--output_dir", base], base, ["sft"])
    pairs = os.path.join(d, "pairs")
    stages.run("pairs", [py, "-m", "nanorlhf.pairs", "--model", base, "--data", args.data, "--output_dir", pairs,
                         "--reward_fn", args.reward_fn, "--questions", str(args.questions),
                         "--eval_questions", str(args.eval_questions), "--samples", str(args.samples),
                         "--pairs_per_question", "2", "--temperature", str(args.temperature),
                         "--max_new_tokens", str(args.response_length), *common, *shlex.split(args.pairs_args)], pairs,
               after_base)
    held_out = (["--eval_data", os.path.join(pairs, "eval.jsonl")] if nonempty(os.path.join(pairs, "eval.jsonl"))
                else ["--val_size", "0"])
    # PPO and GRPO: --iterations, LoRA r 16 at 2e-4, 1 PPO epoch (each rollout used once: on a CPU the update is most
    # of an iteration's time; 2 epochs cost make real 4 more minutes, docs/real.md); GRPO: --group answers to each
    # question, so that a group holds a right one more often
    rl = [py, os.path.join(ROOT, "train_ppo.py"), "--data", args.data, "--num_updates", str(args.iterations),
          "--response_length", str(args.response_length),
          "--learning_rate", "2e-4", "--temperature", str(args.temperature), "--ppo_epochs", "1",
          "--logging_steps", "1", *lora, *common]
    grpo = ["--batch_size", str(args.grpo_batch_size), "--reward_fn", args.reward_fn, "--advantage_estimator", "grpo",
            "--num_samples_per_prompt", str(args.group)]
    if "ppo" in methods:
        rm = os.path.join(d, "rm")
        stages.run("rm", [py, os.path.join(ROOT, "train_rm.py"), "--model", base, "--data",
                          os.path.join(pairs, "train.jsonl"), *held_out, "--output_dir", rm, "--num_train_epochs", "2",
                          "--per_device_train_batch_size", "8", "--learning_rate", "2e-4", "--logging_steps", "5",
                          "--eval_steps", "20", "--normalize_scores", *lora, *common, *shlex.split(args.rm_args)],
                   rm, after=["pairs"])
    train = {  # method: (its training command, the stages it reads from)
        # PPO also logs the accuracy of its sampled answers (weight 0: not rewarded): its curve in the judge's terms
        "ppo": ([*rl, "--sft", base, "--rm", os.path.join(d, "rm"), "--batch_size", str(args.batch_size),
                 "--reward_fn", args.reward_fn, "--reward_fn_weight", "0", *shlex.split(args.ppo_args)], ["rm"]),
        "grpo": ([*rl, "--sft", base, *grpo, *shlex.split(args.grpo_args)], after_base),
        "dpo": ([py, os.path.join(ROOT, "train_dpo.py"), "--model", base, "--data",
                 os.path.join(pairs, "train.jsonl"), *held_out, "--num_train_epochs", "2",
                 "--per_device_train_batch_size", "8", "--logging_steps", "5", "--eval_steps", "20", *lora, *common,
                 *shlex.split(args.dpo_args)], ["pairs"]),
    }
    for method in methods:
        argv, after = train[method]
        trained, merged = os.path.join(d, "train", method), os.path.join(d, method)
        stages.run(method, [*argv, "--output_dir", trained], trained, after)
        stages.run(f"merge {method}", [py, os.path.join(ROOT, "merge_lora.py"), "--base", base, "--adapter", trained,
                                       "--output_dir", merged], merged, [method])
    judges, trained_models = list(dict.fromkeys([*JUDGES, args.reward_fn])), models(args, methods)[1:]
    stages.run("eval", [py, "-m", "nanorlhf.evaluate", f"start={args.model}",
                        *[f"{m}={os.path.join(d, m)}" for m in trained_models], "--data", args.eval_data,
                        "--reward_fn", ",".join(judges), "--max_new_tokens", str(args.eval_max_new_tokens),
                        "--seed", str(seed), "--output_dir", os.path.join(d, "eval")],
               os.path.join(d, "eval"), [f"merge {m}" for m in trained_models])
    return seed_result(d, seed, methods, stages.done)


def cell(values):
    """The value over seeds: mean (min – max), or one value where every seed gave it (the greedy starting model)."""
    return seed_cell(values[:1] if len(set(values)) == 1 else values)


def seconds(values):
    """Wall times over seeds, in whole seconds: mean (min – max), or the one value."""
    if len(set(values)) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ({min(values):.0f} – {max(values):.0f})" if values else "–"


def last_logged(run_dir, key):
    values = [row[key] for row in plots.read_metrics(run_dir) if key in row]
    return values[-1] if values else None


def seed_result(d, seed, methods, done):
    """What one seed measured: each model's held-out row, the pairs, the RM's and DPO's held-out accuracy, the
    stages' wall times."""
    with open(os.path.join(d, "eval", "results.json"), encoding="utf-8") as f:
        rows = {row["model"]: row for row in json.load(f)}
    with open(os.path.join(d, "pairs", "stats.json"), encoding="utf-8") as f:
        pairs = json.load(f)
    for name, row in rows.items():
        row["arithmetic"] = row["accuracy"] / row["readable"] if row.get("readable") else None
        if name in done:
            row["train_s"] = done[name]["wall_s"]
    result = {"seed": seed, "models": rows, "pairs": pairs, "stage_s": {k: v["wall_s"] for k, v in done.items()}}
    if "ppo" in methods:
        result["rm_eval_accuracy"] = last_logged(os.path.join(d, "rm"), "eval/accuracy")
    if "dpo" in methods:
        result["dpo_eval_accuracy"] = last_logged(os.path.join(d, "train", "dpo"), "eval/rewards/accuracies")
    ablate.write_json(os.path.join(d, "result.json"), result)
    return result


def values_of(results, model, key):
    return [r["models"][model][key] for r in results if r["models"][model].get(key) is not None]


def results_table(results, rows, reward_fn="nanorlhf.rewards:accuracy"):
    """Each model's held-out columns (rows: models()): the value (one seed) or mean (min – max) over the seeds."""
    judge = reward_fn.rpartition(":")[2]
    lines = ["| model | trained on | " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for model in rows:
        what = {"start": "- (the starting model)", "sft": SFT_ROW}.get(model) or METHODS[model].format(judge=judge)
        lines.append(f"| {model} | {what} | " + " | ".join((seconds if k == "train_s" else cell)(
            values_of(results, model, k)) for k in COLUMNS) + " |")
    return "\n".join(lines)


def gains(results, method, over):
    return [r["models"][method]["accuracy"] - r["models"][over]["accuracy"] for r in results]


def verdicts(results, rows):
    """For PPO and GRPO, the issue's bar: accuracy at least 0.10 above the starting model's on every seed (so
    beyond the seeds' spread; greedy, the starting model answers the same on every seed), with >= 95% ended.
    With an SFT stage, also what the RL stage itself added: the gain over the SFT model it started from."""
    lines = []
    for method in [m for m in ("ppo", "grpo") if m in rows]:
        over_start, ended = gains(results, method, "start"), min(values_of(results, method, "ended"))
        met = min(over_start) >= 0.10 and ended >= 0.95
        line = (f"- {method}: accuracy {statistics.mean(over_start):+.3f} over the start on average (per seed: "
                f"{', '.join(f'{g:+.3f}' for g in over_start)}), lowest ended share {ended:.3f}: the bar (+0.10 on "
                f"every seed, >= 0.95 ended) is {'met' if met else 'not met'}"
                + (" (one seed: no spread measured)" if len(results) == 1 else ""))
        if "sft" in rows:
            over_sft = gains(results, method, "sft")
            line += (f"; over the SFT model it started from: {statistics.mean(over_sft):+.3f} (per seed: "
                     f"{', '.join(f'{g:+.3f}' for g in over_sft)}), what the RL stage itself added")
        lines.append(line + ".")
    return "\n".join(lines)


def count(values):
    """A count over seeds: the value, or mean (min – max)."""
    if len(set(values)) == 1:
        return f"{values[0]}"
    return f"{statistics.mean(values):.0f} ({min(values)} – {max(values)})"


def pairs_block(results):
    stats = [r["pairs"] for r in results]

    def counted(key):
        return count([s[key] for s in stats])

    block = (f"{counted('questions')} training questions x {stats[0]['samples_per_question']} "
             f"sampled answers; right{' (and ended)' if stats[0].get('right_needs_end', True) else ''}: "
             f"{cell([s['right'] for s in stats])} of the answers, ended "
             f"{cell([s['ended'] for s in stats])}. Questions that yielded a pair (a right and a wrong answer): "
             f"{counted('questions_with_a_pair')} (all right: {counted('all_right')}"
             f", all wrong: {counted('all_wrong')}); pairs: {counted('train_pairs')} "
             f"for training, {counted('eval_pairs')} from the "
             f"{stats[0]['eval_questions']} held-out questions.")
    for key, what in (("rm_eval_accuracy", "The reward model's accuracy on the held-out pairs"),
                      ("dpo_eval_accuracy", "DPO's implicit reward's accuracy on them")):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            block += f" {what}: {cell(values)}."
    return block


def examples_block(args, results, models, per_phrasing=1):
    """The first held-out question of each phrasing: the starting model's answer and each method's (first seed)."""
    d = os.path.join(args.output_dir, f"seed-{results[0]['seed']}")
    with open(os.path.join(d, "eval", "predictions.jsonl"), encoding="utf-8") as f:
        predictions = [json.loads(line) for line in f]
    from nanorlhf.data import read_records

    records = [rec for _, rec in read_records(args.eval_data)]
    picked, seen = [], {}
    for i, rec in enumerate(records):
        kind = rec.get("phrasing", "")
        if seen.get(kind, 0) < per_phrasing:
            seen[kind] = seen.get(kind, 0) + 1
            picked.append(i)
    by_model = {m: [p for p in predictions if p["model"] == m] for m in models}

    def shown(p):
        mark = ("right" if p.get("accuracy") else "readable, wrong" if p.get("readable") else "unreadable") + (
            "" if p["ended"] else ", did not end")
        text = " ".join(p["response"].split()).replace("|", "\\|")
        return f"{text[:90] + ' ...' if len(text) > 90 else text} ({mark})"

    lines = [f"Seed {results[0]['seed']}, greedy; after each answer (its first 90 characters) the judge's verdict.", "",
             "| question (answer) | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for i in picked:
        question = by_model["start"][i]["prompt"].replace("|", "\\|")
        lines.append(f"| {question} ({records[i].get('answer', '')}) | "
                     + " | ".join(shown(by_model[m][i]) for m in models) + " |")
    return "\n".join(lines)


def kinds_block(args, results, models):
    """Accuracy by the held-out records' `phrasing` and `level` fields (make_arith.py's), each model's mean over
    the seeds: which questions a gain came from. Empty for data without those fields."""
    from nanorlhf.data import read_records

    records = [rec for _, rec in read_records(args.eval_data)]
    right = {m: [[0.0] * len(records) for _ in results] for m in models}  # [model][seed][question]
    for s, result in enumerate(results):
        path = os.path.join(args.output_dir, f"seed-{result['seed']}", "eval", "predictions.jsonl")
        with open(path, encoding="utf-8") as f:
            predictions = [json.loads(line) for line in f]
        for m in models:
            for i, p in enumerate(p for p in predictions if p["model"] == m):
                right[m][s][i] = float(p.get("accuracy", 0.0))
    lines = []
    for field in ("phrasing", "level"):
        kinds = sorted({rec[field] for rec in records if field in rec})
        if not kinds:
            continue
        lines += ["| model | " + " | ".join(f"{field} {k} ({sum(r.get(field) == k for r in records)})"
                                             for k in kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
        for m in models:
            cells = []
            for k in kinds:
                picked = [i for i, rec in enumerate(records) if rec.get(field) == k]
                cells.append(cell([statistics.mean(seed[i] for i in picked) for seed in right[m]]))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).strip()


def times_block(results):
    names = list(dict.fromkeys(k for r in results for k in r["stage_s"]))
    lines = ["| stage | wall s |", "|---|---|"]
    lines += [f"| {n} | {seconds([r['stage_s'][n] for r in results if n in r['stage_s']])} |" for n in names]
    lines.append(f"| **one seed, all stages** | {seconds([sum(r['stage_s'].values()) for r in results])} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    check_model_dir(args.model)
    for path in (args.data, args.eval_data, args.sft_data):
        if path and not os.path.exists(path):
            raise UserError(f"{path}: no such file (--data / --eval_data / --sft_data)")
    if args.page and not os.path.isfile(args.page):
        raise UserError(f"--page {args.page}: no such file")
    if args.eval_questions >= args.questions:
        raise UserError(f"--eval_questions {args.eval_questions} leaves none of the --questions {args.questions} "
                        "for training")
    args.model = os.path.abspath(args.model)
    start = time.time()
    results = [run_seed(args, seed, methods) for seed in seeds]
    wall = time.time() - start

    rows = models(args, methods)
    blocks = {"results": results_table(results, rows, args.reward_fn) + "\n\n" + verdicts(results, rows),
              "kinds": kinds_block(args, results, rows), "pairs": pairs_block(results),
              "examples": examples_block(args, results, rows),
              "times": times_block(results)}
    curves = {m: ablate.mean_curve([plots.read_metrics(os.path.join(args.output_dir, f"seed-{s}", "train", m))
                                    for s in seeds], CURVES)
              for m in methods if m in ("ppo", "grpo")}
    picture = plots.plot(curves, os.path.join(args.output_dir, "curves.png"), CURVES,
                         title="seed mean; objective/fn_scores: accuracy of the sampled answers")
    heading = (f"Seeds {args.seeds}" if len(seeds) > 1 else f"Seed {seeds[0]}") + (
        f": mean (min – max) over {len(seeds)} seeds" if len(seeds) > 1 else "")
    report = "\n\n".join(f"## {name}\n\n{block}" for name, block in blocks.items())
    atomic_write_text(os.path.join(args.output_dir, "results.md"), f"# make real: {heading}\n\n{report}\n")
    ablate.write_json(os.path.join(args.output_dir, "results.json"), {"seeds": seeds, "methods": methods,
                                                                       "runs": results})
    print(report)
    info(f"{len(seeds)} seed(s) in {wall // 60:.0f} min {wall % 60:.0f} s; {args.output_dir}/results.md")
    if args.page:
        with open(args.page, encoding="utf-8") as f:
            text = f.read()
        if picture:
            figure = os.path.join(os.path.dirname(args.page), "real_curves.png")
            shutil.copyfile(picture, figure)
            blocks["results"] += f"\n\n![learning curves, seed mean]({os.path.basename(figure)})"
        blocks["run"] = (f"Measured by `python -m nanorlhf.real {shlex.join(argv)}` on {os.cpu_count()} CPU cores "
                         f"({heading.lower()}); this call took {wall // 60:.0f} min {wall % 60:.0f} s, stages "
                         "finished before reused: each stage's own wall time is under \"Where the time goes\".")
        for name, block in blocks.items():
            text = fill(text, name, block)
        atomic_write_text(args.page, text)
        info(f"wrote the measured blocks into {args.page}")


if __name__ == "__main__":
    run_main(main)
