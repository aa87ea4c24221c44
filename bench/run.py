"""Benchmark nanorlhf's PPO against TRL's PPOTrainer on the same workload, side by side (`make bench`).

    python bench/run.py                         # tiny + small models, LoRA + full: 5-10 min on a 2-core CPU
    python bench/run.py --sizes tiny --modes lora --num_updates 3     # a quick look

1. Models, built here from data/demo/pt.txt (nothing downloaded): train_pt.py with no --model builds
   the tiny default and a "small" one, a few PT steps each (good weights are not the point). Each is
   the SFT policy, and, converted to AutoModelForSequenceClassification(num_labels=1), the reward model.
   Their tokenizer gets an EOS the model cannot sample (an id past its vocabulary), so every response on
   both sides is exactly --response_length tokens: the same work, whatever either side's sampler draws.
   The prompts are --batch_size prompts of data/demo/ppo.jsonl with the same token length (no padding).
2. PPO, for each size and finetuning type (LoRA on policy and critic, or both trained whole): train_ppo.py
   and bench/trl_ppo.py (TRL's PPOTrainer, trl==1.12.0) one after the other, each in a fresh process
   (bench/peak.py records its peak memory); the first iteration is a warm-up and is not counted.
3. Sampling: nanorlhf.rollout.generate against transformers' model.generate (bench/generate_bench.py).
Results: bench/results/latest.json and latest.md (how to read them: bench/README.md).
"""

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BENCH_EOS = "<|bench_eos|>"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small", help="nanorlhf.tiny SIZES to build, comma-separated")
    p.add_argument("--modes", default="lora,full", help="finetuning types to compare: lora, full")
    p.add_argument("--num_updates", type=int, default=3, help="PPO iterations per run (1st: warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side per configuration (alternating)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per PPO iteration")
    p.add_argument("--response_length", type=int, default=48, help="tokens per response (fixed)")
    p.add_argument("--num_mini_batches", type=int, default=2)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--pt_steps", type=int, default=5, help="PT steps when building each model")
    p.add_argument("--gen_repeats", type=int, default=5, help="timed calls of each generate")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (0 = torch's default); "
                   "one thread keeps timings steady on a busy or shared machine")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"], help="what a second is: "
                   "wall clock, or the process's CPU time (immune to other load; needs one thread); "
                   "auto: cpu on a CPU with --threads 1, else wall")
    p.add_argument("--no_trl", action="store_true", help="nanorlhf only")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "bench"))
    p.add_argument("--results_dir", default=os.path.join(BENCH, "results"))
    return p.parse_args()


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(args):
    env = dict(os.environ, TQDM_DISABLE="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["BENCH_CLOCK"] = args.clock
    return env


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run(cmd, log_path, args, peak_json=None):
    """Run a command (a Python script under bench/peak.py if peak_json), its output to log_path.
    Returns (ok, wall seconds, peak memory dict or None, the last lines of its output)."""
    env = child_env(args)
    if peak_json:
        env["BENCH_PEAK_JSON"] = peak_json
        cmd = [sys.executable, os.path.join(BENCH, "peak.py")] + cmd
    else:
        cmd = [sys.executable] + cmd
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    with open(log_path) as f:
        tail = f.read().strip().splitlines()[-8:]
    peak = read_json(peak_json) if peak_json and os.path.exists(peak_json) else None
    return proc.returncode == 0, wall, peak, tail


# ---------------------------------------------------------------- 1. models and prompts

def build_models(size, args, work):
    """PT a `size` model from the demo corpus; write sft/ (policy), rm/ (reward) and prompts.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from nanorlhf.data import encode_prompt, prompt_messages, read_records

    pt = os.path.join(work, "pt")
    cmd = ["train_pt.py", "--data", "data/demo/pt.txt", "--output_dir", pt, "--model_size", size,
           "--max_steps", str(args.pt_steps), "--per_device_train_batch_size", "16",
           "--learning_rate", "3e-3", "--logging_steps", str(args.pt_steps)]
    ok, wall, _, tail = run(cmd, os.path.join(work, "pt.log"), args)
    if not ok:
        raise SystemExit(f"train_pt.py failed ({size}):\n" + "\n".join(tail))
    tokenizer = AutoTokenizer.from_pretrained(pt)
    vocab_size = AutoModelForCausalLM.from_pretrained(pt).config.vocab_size
    tokenizer.add_special_tokens({"eos_token": BENCH_EOS})  # id == vocab_size: no logit can ever pick it
    assert tokenizer.eos_token_id >= vocab_size, (tokenizer.eos_token_id, vocab_size)
    sft, rm = os.path.join(work, "sft"), os.path.join(work, "rm")
    AutoModelForCausalLM.from_pretrained(pt).save_pretrained(sft)
    torch.manual_seed(0)  # the score head is new: a seeded random init
    AutoModelForSequenceClassification.from_pretrained(pt, num_labels=1).save_pretrained(rm)
    for d in (sft, rm):
        tokenizer.save_pretrained(d)

    by_length = collections.defaultdict(list)
    for where, rec in read_records(os.path.join(ROOT, "data", "demo", "ppo.jsonl")):
        by_length[len(encode_prompt(tokenizer, prompt_messages(rec, where)))].append(rec)
    length = max(by_length, key=lambda n: (len(by_length[n]) >= args.batch_size, len(by_length[n])))
    chosen = (by_length[length] * args.batch_size)[:args.batch_size]
    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w") as f:
        for rec in chosen:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft).parameters())
    log(f"{size}: {n_params:,} parameters, vocab {vocab_size}, {len(chosen)} prompts of {length} tokens "
        f"(PT {wall:.0f}s)")
    return {"sft": sft, "rm": rm, "prompts": prompts, "params": n_params, "prompt_tokens": length,
            "vocab_size": vocab_size}


# ---------------------------------------------------------------- 2. PPO, both sides

def summarize(runs):
    """Per-iteration seconds over every run's iterations after its first (a warm-up): the mean, and the
    best iteration (on a shared machine other work only ever adds time, so the minimum is the steadiest
    estimate). Peak memory: the largest over the runs."""
    timed = [it for r in runs for it in (r["iterations"][1:] or r["iterations"])]
    mean = lambda key: statistics.mean(it[key] for it in timed)  # noqa: E731
    out = {"ppo_iter_s": mean("iter_s"), "ppo_iter_min_s": min(it["iter_s"] for it in timed),
           "rollout_s": mean("rollout_s"), "score_s": mean("score_s"), "update_s": mean("update_s"),
           "rollout_tok_s": statistics.mean(it["response_tokens"] / it["rollout_s"] for it in timed),
           "measured_iterations": len(timed), "runs": len(runs)}
    peaks = [r["peak"] for r in runs if r["peak"]]
    out["peak_rss_mb"] = max(p["rss_mb"] for p in peaks) if peaks else None
    if any("cuda_max_allocated_mb" in p for p in peaks):
        out["peak_cuda_mb"] = max(p["cuda_max_allocated_mb"] for p in peaks)
    out["peak_mb"] = out.get("peak_cuda_mb", out["peak_rss_mb"])
    out["iter_s_each"] = [[round(it["iter_s"], 3) for it in r["iterations"]] for r in runs]
    out["process_wall_s"] = [round(r["wall"], 1) for r in runs]
    return out


def workload_flags(args, models, mode):
    return ["--sft", models["sft"], "--rm", models["rm"], "--data", models["prompts"],
            "--finetuning_type", mode, "--num_updates", str(args.num_updates),
            "--batch_size", str(args.batch_size),
            "--num_mini_batches", str(args.num_mini_batches), "--ppo_epochs", str(args.ppo_epochs),
            "--response_length", str(args.response_length), "--temperature", "0.7", "--learning_rate", "1e-4",
            "--lora_rank", "8", "--lora_alpha", "16", "--seed", "42"]


def run_nanorlhf(args, models, mode, work, round_):
    out_dir = os.path.join(work, f"nanorlhf-{mode}-{round_}")
    cmd = ["train_ppo.py", *workload_flags(args, models, mode), "--output_dir", out_dir,
           "--logging_steps", "1", "--max_grad_norm", "0", "--save_steps", "0", "--kl_coef", "0.05",
           "--missing_eos_penalty", "1.0"]
    ok, wall, peak, tail = run(cmd, out_dir + ".log", args, out_dir + ".peak.json")
    if not ok:
        return {"error": "train_ppo.py failed: " + " | ".join(tail)}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    iterations = [{"rollout_s": r["time/rollout_s"], "score_s": r["time/score_s"],
                   "update_s": r["time/update_s"],
                   "iter_s": r["time/rollout_s"] + r["time/score_s"] + r["time/update_s"],
                   "response_tokens": r["val/response_length"] * args.batch_size} for r in rows]
    return {"iterations": iterations, "peak": peak, "wall": wall}


def run_trl(args, models, mode, work, round_):
    trl_version = versions()["trl"]
    if trl_version is None:
        return {"error": 'trl is not installed: pip install "trl==1.12.0" (or pip install -e ".[bench]")'}
    if trl_version != "1.12.0":
        return {"error": f"needs trl==1.12.0 (the last release with PPOTrainer), found {trl_version}"}
    out_dir = os.path.join(work, f"trl-{mode}-{round_}")
    cmd = [os.path.join(BENCH, "trl_ppo.py"), *workload_flags(args, models, mode), "--output_dir", out_dir,
           "--timings", out_dir + ".timings.json"]
    ok, wall, peak, tail = run(cmd, out_dir + ".log", args, out_dir + ".peak.json")
    if not ok:
        return {"error": "TRL PPOTrainer failed: " + " | ".join(tail)}
    iterations = read_json(out_dir + ".timings.json")["iterations"]
    return {"iterations": iterations, "peak": peak, "wall": wall}


def import_baseline(args, work):
    """Peak RSS of a process that only imports what each side imports (CPU peaks include it)."""
    baseline = {}
    sides = {"nanorlhf": "import train_ppo",
             "trl": "import train_ppo, peft, datasets; from trl.experimental.ppo import PPOTrainer"}
    for side, code in sides.items():
        if side == "trl" and args.no_trl:
            continue
        script = os.path.join(work, f"imports_{side}.py")
        with open(script, "w") as f:
            f.write(f"import sys; sys.path.insert(0, {ROOT!r})\n{code}\n")
        ok, _, peak, _ = run([script], script + ".log", args, script + ".peak.json")
        baseline[side] = peak["rss_mb"] if ok and peak else None
    return baseline


# ---------------------------------------------------------------- 3. sampling

def run_generate(args, models, work):
    out = os.path.join(work, "generate.json")
    ok, _, _, tail = run([os.path.join(BENCH, "generate_bench.py"), "--model", models["sft"], "--data",
                          models["prompts"], "--out", out, "--response_length", str(args.response_length),
                          "--repeats", str(args.gen_repeats)], os.path.join(work, "generate.log"), args)
    return read_json(out) if ok else {"error": "generate_bench.py failed: " + " | ".join(tail)}


# ---------------------------------------------------------------- results

def machine_info(args):
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "threads_per_process": args.threads or torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
        info["dtype"] = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        info["device"], info["dtype"] = "cpu", "float32"
    return info


def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "nanorlhf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:  # read-only git queries: the commit, and whether the working tree differs from it
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # git status must not even refresh the index
        git = lambda *cmd: subprocess.run(["git", *cmd], cwd=ROOT, env=env, text=True,  # noqa: E731
                                          capture_output=True, check=False).stdout.strip()
        out["nanorlhf_commit"] = (git("rev-parse", "--short", "HEAD") or None)
        if out["nanorlhf_commit"] and git("status", "--porcelain", "--untracked-files=no"):
            out["nanorlhf_commit"] += "+modified"
    except OSError:
        out["nanorlhf_commit"] = None
    return out


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_markdown(results, path):
    m, v, w = results["machine"], results["versions"], results["workload"]
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    lines = [
        f"# nanorlhf vs TRL: PPO benchmark ({results['date']}, {results['total_s']:.0f} s)", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['threads_per_process']} thread(s) per process; "
        f"device {m['device']}{gpu}, {m['dtype']}; load average {fmt(m['load_average_at_start'])} at the "
        f"start, {fmt(m.get('load_average_at_end'))} at the end.",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}, "
        f"nanorlhf {v['nanorlhf']} ({v['nanorlhf_commit']}).",
        f"Workload: {w['batch_size']} prompts x {w['response_length']} response tokens (fixed) per "
        f"iteration, {w['ppo_epochs']} PPO epochs x {w['num_mini_batches']} minibatches, critic + GAE; "
        f"per run {w['num_updates'] - 1} timed iteration(s) after a warm-up, {w['rounds']} run(s) per "
        "side, in alternating order. Same models, prompts and settings on both sides. Seconds are "
        + ("CPU seconds of the process (one thread: what the wall clock reads on an idle machine)."
           if w["clock"] == "cpu" else "wall-clock seconds."),
        "", "## PPO iteration: seconds per iteration, mean (best); ratios > 1 favour nanorlhf", "",
        "| model | finetuning | side | iteration | rollout | score+ref+values | update | rollout tok/s "
        "| peak MB | TRL/nanorlhf time | TRL/nanorlhf peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, nano in results["nanorlhf"].items():
        size, mode = config.split("/")
        label = f"{size} ({results['models'][size]['params'] / 1e6:.1f}M)"
        ratio = results["ratios"].get(config, {})
        for side, r in (("nanorlhf", nano), ("TRL", results["trl"].get(config, {}))):
            if "error" in r or not r:
                lines.append(f"| {label} | {mode} | {side} | {r.get('error', 'not run')} |||||||")
                continue
            compare = (f"**{fmt(ratio.get('speedup'))}x** ({fmt(ratio.get('speedup_best_iteration'))}x) | "
                       f"**{fmt(ratio.get('peak_ratio'))}x** |") if side == "TRL" and ratio else " | |"
            lines.append(f"| {label} | {mode} | {side} | {fmt(r['ppo_iter_s'])} "
                         f"({fmt(r['ppo_iter_min_s'])}) | {fmt(r['rollout_s'])} | {fmt(r['score_s'])} | "
                         f"{fmt(r['update_s'])} | {fmt(r['rollout_tok_s'], 0)} | {fmt(r['peak_mb'], 0)} | "
                         + compare)
    if m["device"] == "cpu":
        base = results.get("import_baseline_rss_mb", {})
        lines += ["", f"Peak on CPU = the process's max RSS, imports included (importing alone: "
                  f"{fmt(base.get('nanorlhf'), 0)} MB for nanorlhf, {fmt(base.get('trl'), 0)} MB for TRL)."]
    lines += ["", "## Sampling: nanorlhf.rollout.generate vs transformers' model.generate, tokens/s median "
              "(best)", "",
              "| model | batch x tokens | nanorlhf | transformers | ratio |", "|---|---|---|---|---|"]
    for size, g in results["generate"].items():
        if "error" in g:
            lines.append(f"| {size} | {g['error']} ||||")
            continue
        lines.append(f"| {size} | {g['batch']} x {g['response_length']} | {fmt(g['nanorlhf_tok_s'], 0)} "
                     f"({fmt(g['nanorlhf_best_tok_s'], 0)}) | {fmt(g['transformers_tok_s'], 0)} "
                     f"({fmt(g['transformers_best_tok_s'], 0)}) | **{fmt(g['ratio'])}x** "
                     f"({fmt(g['ratio_best'])}x) |")
    lines += ["", "## Targets", ""]
    for name, t in results["targets"].items():
        lines.append(f"- {name}: {'met' if t['met'] else 'NOT met'} ({t['detail']})")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def targets(results):
    def detail(ratios):
        return ", ".join(f"{c} {fmt(x)}x" for c, x in ratios.items()) or "TRL did not run"

    def check(ratios, ok):
        return {"met": bool(ratios) and all(x is not None and ok(x) for x in ratios.values()),
                "detail": detail(ratios)}

    speed = {c: r["speedup"] for c, r in results["ratios"].items()}
    peaks = {c: r["peak_ratio"] for c, r in results["ratios"].items()}
    gen = {s: g.get("ratio") for s, g in results["generate"].items()}
    return {"PPO iteration >= 1.5x faster than TRL": check(speed, lambda x: x >= 1.5),
            "lower peak memory than TRL": check(peaks, lambda x: x > 1.0),
            "rollout tokens/s >= transformers' generate": check(gen, lambda x: x >= 1.0)}


def main():
    args = parse_args()
    start = time.perf_counter()
    sys.path.insert(0, ROOT)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.results_dir, exist_ok=True)
    if args.threads > 0:
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.clock == "auto":
        import torch

        args.clock = "cpu" if args.threads == 1 and not torch.cuda.is_available() else "wall"
    names = ("batch_size", "response_length", "num_mini_batches", "ppo_epochs", "num_updates", "rounds",
             "clock")
    workload = {k: getattr(args, k) for k in names}
    workload.update(temperature=0.7, lora_rank=8, lora_alpha=16, lora_target="all linear layers",
                    kl_coef=0.05, missing_eos_penalty=1.0, max_grad_norm=0, gradient_checkpointing=False)
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(args),
               "versions": versions(), "workload": workload, "models": {},
               "nanorlhf": {}, "trl": {}, "ratios": {}, "generate": {}}
    modes = [m for m in args.modes.split(",") if m]
    flip = False
    for size in [s for s in args.sizes.split(",") if s]:
        work = os.path.join(args.work_dir, size)
        shutil.rmtree(work, ignore_errors=True)  # every run starts from scratch
        os.makedirs(work)
        models = build_models(size, args, work)
        results["models"][size] = {k: models[k] for k in ("params", "prompt_tokens", "vocab_size")}
        for mode in modes:
            config = f"{size}/{mode}"
            sides = [("nanorlhf", run_nanorlhf)] + ([] if args.no_trl else [("trl", run_trl)])
            runs = {side: [] for side, _ in sides}
            for round_ in range(1, args.rounds + 1):
                for side, fn in (sides[::-1] if flip else sides):  # alternate who goes first
                    r = fn(args, models, mode, work, round_)
                    runs[side].append(r)
                    log(f"{config} {side} (round {round_}): " + (r["error"] if "error" in r else
                        " ".join(f"{it['iter_s']:.2f}" for it in r["iterations"]) + " s/iteration"))
                flip = not flip
            for side, side_runs in runs.items():
                errors = [r["error"] for r in side_runs if "error" in r]
                results[side][config] = {"error": errors[0]} if errors else summarize(side_runs)
            nano, trl = results["nanorlhf"][config], results["trl"].get(config, {})
            if "ppo_iter_s" in nano and "ppo_iter_s" in trl:
                results["ratios"][config] = {
                    "speedup": trl["ppo_iter_s"] / nano["ppo_iter_s"],
                    "speedup_best_iteration": trl["ppo_iter_min_s"] / nano["ppo_iter_min_s"],
                    "peak_ratio": trl["peak_mb"] / nano["peak_mb"]}
        results["generate"][size] = g = run_generate(args, models, work)
        log(f"{size} generate: " + (g["error"] if "error" in g else
            f"nanorlhf {g['nanorlhf_tok_s']:.0f} tok/s, transformers {g['transformers_tok_s']:.0f} tok/s"))
    if results["machine"]["device"] == "cpu":
        results["import_baseline_rss_mb"] = import_baseline(args, args.work_dir)
    results["targets"] = targets(results)
    results["total_s"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with open(os.path.join(args.results_dir, "latest.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(args.results_dir, "latest.md"))
    log(f"done in {results['total_s']:.0f} s: {os.path.join(args.results_dir, 'latest.md')}")
    with open(os.path.join(args.results_dir, "latest.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
