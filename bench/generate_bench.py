"""Sampling speed: nanorlhf.sampling.generate against transformers' model.generate.

    python bench/generate_bench.py --model DIR --data PROMPTS --out OUT.json [--repeats 5]

The same model, prompts (one batch), response length and sampling (temperature, no top-k/top-p);
both sides produce exactly --response_length tokens per prompt (run under bench/peak.py, whose hook
makes the end-of-turn token impossible to sample, as bench/run.py does). Repeats alternate which
side goes first, after one warm-up call each; we report the median tokens/s of each (and the best
call's) and their ratio.
nanorlhf's generate also returns the log-prob of every sampled token (PPO's old log-probs);
model.generate returns tokens only.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from nanorlhf.args import pick_device
from nanorlhf.data import encode_prompt, pad, prompt_messages, read_records
from nanorlhf.loading import load_model, load_tokenizer
from nanorlhf.metrics import info
from nanorlhf.sampling import generate

# BENCH_CLOCK=cpu (set by bench/run.py): count this process's CPU seconds, not wall-clock ones.
clock = time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--response_length", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device, dtype = pick_device()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, AutoModelForCausalLM, device, dtype).eval()
    prompts = [encode_prompt(tokenizer, prompt_messages(r, where)) for where, r in read_records(args.data)]
    eos, pad_id, R = tokenizer.eos_token_id, tokenizer.pad_token_id, args.response_length
    input_ids = pad(prompts, pad_id, side="left").to(device)
    attention_mask = pad([[1] * len(q) for q in prompts], 0, side="left").to(device)

    def ours():
        response = generate(model, prompts, R, [eos], pad_id, args.temperature)["response"]
        return response.numel()

    @torch.inference_mode()
    def transformers_generate():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=R,
                             do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                             eos_token_id=eos, pad_token_id=pad_id)
        return out[:, input_ids.shape[1]:].numel()

    sides = {"nanorlhf": ours, "transformers": transformers_generate}
    torch.manual_seed(args.seed)
    tokens = {name: fn() for name, fn in sides.items()}  # warm-up; every response is R tokens long
    assert tokens["nanorlhf"] == tokens["transformers"] == len(prompts) * R, tokens
    seconds = {name: [] for name in sides}
    for rep in range(args.repeats):
        for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            sync(device)
            start = clock()
            sides[name]()
            sync(device)
            seconds[name].append(clock() - start)
    result = {"batch": len(prompts), "response_length": R, "repeats": args.repeats}
    for name in sides:
        result[f"{name}_tok_s"] = tokens[name] / statistics.median(seconds[name])
        result[f"{name}_best_tok_s"] = tokens[name] / min(seconds[name])
        result[f"{name}_s"] = seconds[name]
    result["ratio"] = result["nanorlhf_tok_s"] / result["transformers_tok_s"]
    result["ratio_best"] = result["nanorlhf_best_tok_s"] / result["transformers_best_tok_s"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    info(f"generate: nanorlhf {result['nanorlhf_tok_s']:.0f} tok/s, transformers "
            f"{result['transformers_tok_s']:.0f} tok/s ({result['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
