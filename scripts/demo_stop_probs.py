"""Where a demo policy ends its answer: P(end of turn) after the advice and after the doctor sentence.

    python scripts/demo_stop_probs.py sft=runs/demo/sft-merged ppo=runs/demo/ppo-merged [--data data/demo/test.jsonl]

For every held-out prompt, the model reads its full reference answer (condition, advice, "See a doctor
if ...") cut after the advice sentence and whole, and we take the probability it gives the end-of-turn
token next. A good policy continues after the advice (low) and stops after the doctor sentence (high);
a policy that stacks doctor sentences (docs/demo.md) has a low value after the doctor sentence on some
prompts, so the lowest value is printed beside the mean.
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanorlhf.args import ArgumentParser  # noqa: E402
from nanorlhf.data import encode_answer, prompt_messages, read_records  # noqa: E402
from nanorlhf.errors import UserError, run_main  # noqa: E402
from nanorlhf.evaluate import load_policy  # noqa: E402
from nanorlhf.rubric import load_world  # noqa: E402


def end_probability(model, tokenizer, messages, answer):
    """P(the answer's closing end-of-turn token | prompt + answer), from one forward pass."""
    ids = encode_answer(tokenizer, messages, answer)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, -1].float()
    return logits.softmax(-1)[ids[-1]].item()


def stop_probs(model, tokenizer, records, world):
    """One row per (where, record) of read_records: P(end) after the advice and after the doctor sentence."""
    rows = []
    for where, rec in records:
        doctor = world.get(rec.get("condition"), {}).get(f"doctor_{rec.get('lang')}")
        if not doctor or not str(rec.get("reference", "")).endswith(doctor):
            raise UserError(f"{where}: needs a condition, a lang and a reference ending with that condition's "
                            "doctor sentence (as in data/demo/test.jsonl)")
        messages = prompt_messages(rec, where)
        advice_cut = rec["reference"][:-len(doctor)].rstrip()
        rows.append({"prompt": rec["prompt"],
                     "after_advice": end_probability(model, tokenizer, messages, advice_cut),
                     "after_doctor": end_probability(model, tokenizer, messages, rec["reference"])})
    return rows


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=DIR: models to read (merged, or a LoRA adapter on its base)")
    parser.add_argument("--data", default="data/demo/test.jsonl", help="held-out prompts with their references")
    parser.add_argument("--world", default="data/demo/world.json", help="the demo's conditions")
    args = parser.parse_args(argv)
    records = read_records(args.data)
    world = {c["id"]: c for c in load_world(args.world)["conditions"]}
    torch.set_num_threads(1)
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{spec}: expected NAME=DIR")
        tokenizer, model = load_policy(path, torch.device("cpu"), torch.float32)
        rows = stop_probs(model, tokenizer, records, world)
        low = min(rows, key=lambda r: r["after_doctor"])
        print(json.dumps({
            "model": name,
            "end_after_advice": {"mean": round(statistics.mean(r["after_advice"] for r in rows), 3),
                                 "max": round(max(r["after_advice"] for r in rows), 3)},
            "end_after_doctor": {"mean": round(statistics.mean(r["after_doctor"] for r in rows), 3),
                                 "min": round(low["after_doctor"], 3), "min_prompt": low["prompt"]},
        }, ensure_ascii=False))


if __name__ == "__main__":
    run_main(main)
