"""See what RLHF did: several models answer the same held-out prompts, side by side.

    python -m nanorlhf.evaluate sft=runs/demo/sft-merged ppo=runs/demo/ppo \\
        --rm runs/demo/rm-merged --data data/demo/test.jsonl --output_dir runs/demo/eval

For each model: mean reward-model score (± its spread), the gold rubric of the demo world (an
independent judge: RM score up but rubric down means reward hacking), the share of answers that
ended (with the end-of-turn token, before --max_new_tokens), the share that repeat no sentence or
4-gram (no_repeat), response length, distinct-1/2, KL to the reference model (the first one
named, unless --ref), and ROUGE-L against the references (character-level for Chinese). Writes
predictions.jsonl, results.md, results.json and, with matplotlib installed, results.png.

Judges that are programs: --reward_fn SPEC (train_ppo.py's flag: FILE.py:NAME or package.module:NAME,
comma-separated, with --reward_fn_kwargs) adds a column per function, its mean over the answers:

    python -m nanorlhf.evaluate sft=runs/sft ppo=runs/ppo --data data/real/arith_test.jsonl \\
        --reward_fn nanorlhf.rewards:accuracy

The gold rubric is the demo world's judge: its column appears only for records that name a demo
`condition`; other data is judged by the reward model and the reward functions given.

Answers get room to end: --max_new_tokens defaults to 256, several times what a policy is trained
to write. Cut at the training length, a policy that has learnt never to stop looks as good as one
that answers and stops (the demo's first PPO model did exactly that).
A model is a merged model dir or a LoRA adapter dir (its base read from adapter_config.json).
"""

import json
import os
import re
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from nanorlhf.args import SEED_RANGE, ArgumentParser, pick_device
from nanorlhf.data import encode_prompt, prompt_messages, read_records
from nanorlhf.errors import UserError, run_main
from nanorlhf.files import atomic_save
from nanorlhf.loading import load_model, load_tokenizer
from nanorlhf.lora import load_adapter, merge_lora
from nanorlhf.metrics import info
from nanorlhf.rewards import compute_rewards, load_reward_fns
from nanorlhf.forward import policy_logits, reward_scores
from nanorlhf.rubric import gold_score, has_repeat, load_world
from nanorlhf.sampling import decode_responses, ended_with_eos, generate
from nanorlhf.template import stop_ids

_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)  # one CJK character, or a word


def units(text):
    """What ROUGE-L and distinct-n count: each Chinese character, each other word (lowercased)."""
    return [u.lower() for u in _WORD.findall(text)]


def rouge_l(prediction, reference):
    """ROUGE-L F1 (Lin 2004): from the longest common subsequence of the two unit sequences."""
    a, b = units(prediction), units(reference)
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts, n):
    """Distinct n-grams / all n-grams over every response (Li et al. 2016); low = repetitive."""
    grams = [tuple(u[i:i + n]) for u in map(units, texts) for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def load_policy(path, device, dtype, trust_remote_code=False):
    """A merged model dir, or an adapter dir merged onto the base it names."""
    adapter_config = os.path.join(path, "adapter_config.json")
    tokenizer = load_tokenizer(path, trust_remote_code)
    if not os.path.isfile(adapter_config):
        return tokenizer, load_model(path, AutoModelForCausalLM, device, dtype, trust_remote_code, tokenizer).eval()
    with open(adapter_config, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path") or ""
    model = load_model(base, AutoModelForCausalLM, device, torch.float32, trust_remote_code, tokenizer)
    merge_lora(load_adapter(model, path))
    return tokenizer, model.to(dtype).eval()


@torch.no_grad()
def kl_to_reference(model, ref, batch):
    """Exact KL(model || ref) of each response of a batch (nanorlhf.sampling), summed over its tokens: at
    every position the full next-token distributions are compared, so it is exact even for greedy answers. [B]"""
    logp = policy_logits(model, batch).float().log_softmax(-1)
    logq = policy_logits(ref, batch).float().log_softmax(-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(batch["response_mask"] > 0, per_token, 0.0).sum(1)


MAX_NEW_TOKENS = 256  # room to end: well beyond what the demo (and most PPO runs) train responses to


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=DIR, e.g. sft=runs/sft-merged ppo=runs/ppo")
    parser.add_argument("--data", default="data/demo/test.jsonl", help="held-out prompts (+ reference, condition)")
    parser.add_argument("--rm", default="", help="a reward model dir to score the answers")
    parser.add_argument("--ref", default="", help="reference model for KL (default: the first model)")
    parser.add_argument("--world", default="data/demo/world.json", help="the demo world, for the gold rubric")
    parser.add_argument("--reward_fn", default="", help="reward function(s) FILE.py:NAME or package.module:NAME, "
                        "comma-separated: a column each (e.g. nanorlhf.rewards:accuracy)")
    parser.add_argument("--reward_fn_kwargs", default="", help="JSON object of keyword arguments for them")
    parser.add_argument("--output_dir", default="", help="where predictions and the table go")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, range=">0",
                        help="room to end; an answer still going at this length counts as not ended")
    parser.add_argument("--temperature", type=float, default=0.0, range=">=0", help="0 = greedy (default)")
    parser.add_argument("--batch_size", type=int, default=32, range=">0")
    parser.add_argument("--seed", type=int, default=0, range=SEED_RANGE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the models' own code")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, dtype = pick_device(args.device)

    named = []
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"model {spec!r}: expected NAME=DIR")
        named.append((name, path))
    reward_fns = load_reward_fns(args.reward_fn, args.reward_fn_kwargs)
    columns = reward_fn_columns([spec for spec, _, _ in reward_fns])
    records = read_records(args.data)
    tokenizer, _ = load_policy(named[0][1], torch.device("cpu"), torch.float32, args.trust_remote_code)
    messages = [prompt_messages(rec, where) for where, rec in records]
    prompts = [encode_prompt(tokenizer, m, where) for m, (where, _) in zip(messages, records)]
    prompt_texts = [m[-1]["content"] for m in messages]  # what train_ppo.py hands a reward function
    world = None
    if any("condition" in rec for _, rec in records) and os.path.isfile(args.world):
        world = load_world(args.world)
    reward_model = (load_model(args.rm, AutoModelForSequenceClassification, device, dtype,
                                  args.trust_remote_code, tokenizer, num_labels=1).eval() if args.rm else None)
    ref_name, ref_path = ("ref", args.ref) if args.ref else named[0]
    _, ref = load_policy(ref_path, device, dtype, args.trust_remote_code)

    results, predictions = [], []
    for name, path in named:
        tok, model = load_policy(path, device, dtype, args.trust_remote_code)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{path}: its tokenizer differs from {named[0][1]}'s; compare models of one pipeline")
        eos_ids = stop_ids(tok, model)  # the end of turn and the model's own EOS ids
        torch.manual_seed(args.seed)  # every model samples with the same seed
        # the reference itself (by default the first model): its KL is 0, not worth two forwards per batch
        is_ref = os.path.realpath(path) == os.path.realpath(ref_path)
        answers, scores, kls, lengths, ended = [], [], [], [], []
        for i in range(0, len(prompts), args.batch_size):
            batch = generate(model, prompts[i:i + args.batch_size], args.max_new_tokens, eos_ids, tok.pad_token_id,
                             args.temperature)
            with torch.no_grad():
                if reward_model is not None:
                    scores += reward_scores(reward_model, batch).tolist()
                kls += [0.0] * len(batch["response"]) if is_ref else kl_to_reference(model, ref, batch).tolist()
            lengths += batch["response_mask"].sum(1).tolist()
            ended += ended_with_eos(batch["response"], eos_ids).tolist()
            answers += decode_responses(tok, batch)
        row = {"model": name, "n": len(answers), "ended": statistics.mean(ended),
               "no_repeat": statistics.mean(not has_repeat(a) for a in answers),
               "response_length": statistics.mean(lengths), f"kl_to_{ref_name}": statistics.mean(kls),
               "distinct_1": distinct_n(answers, 1), "distinct_2": distinct_n(answers, 2)}
        if not all(ended):
            info(f"{name}: {len(ended) - sum(ended)} of {len(ended)} answers did not end within "
                    f"--max_new_tokens {args.max_new_tokens}")
        if scores:
            row["rm_score"] = statistics.mean(scores)
            row["rm_score_sd"] = statistics.stdev(scores) if len(scores) > 1 else 0.0
        fn_scores = {column: compute_rewards([reward_fn], prompt_texts, answers, [rec for _, rec in records],
                                             [where for where, _ in records])
                     for column, reward_fn in zip(columns, reward_fns)}
        row.update({column: statistics.mean(values) for column, values in fn_scores.items()})
        golds, rouges = [], []
        for j, ((_, rec), answer) in enumerate(zip(records, answers)):
            pred = {"model": name, "prompt": prompt_texts[j], "response": answer, "ended": ended[j]}
            if scores:
                pred["rm_score"] = scores[j]
            pred.update({column: values[j] for column, values in fn_scores.items()})
            if world is not None and rec.get("condition"):
                pred["gold"] = gold_score(answer, rec["condition"], world, rec.get("lang"))
                golds.append(pred["gold"]["total"])
            if isinstance(rec.get("reference"), str):
                pred["rouge_l"] = rouge_l(answer, rec["reference"])
                rouges.append(pred["rouge_l"])
            predictions.append(pred)
        if golds:
            row["gold"] = statistics.mean(golds)
        if rouges:
            row["rouge_l"] = statistics.mean(rouges)
        results.append(row)
        del model

    table = markdown_table(results, columns)
    print(table)
    if args.output_dir:
        write_outputs(args.output_dir, results, predictions, table, columns)


# The names evaluate's own columns take in results.json and predictions.jsonl.
OWN_COLUMNS = {"model", "n", "prompt", "response", "ended", "no_repeat", "response_length", "distinct_1",
               "distinct_2", "rm_score", "rm_score_sd", "gold", "rouge_l"}


def reward_fn_columns(specs):
    """A column name for each --reward_fn: its function's NAME ("accuracy"), or the whole spec where the NAME
    is taken by another function or by one of evaluate's own columns (nanorlhf.rewards:gold vs the rubric)."""
    names = [spec.rpartition(":")[2] for spec in specs]
    return [name if names.count(name) == 1 and name not in OWN_COLUMNS and not name.startswith("kl_to_") else spec
            for name, spec in zip(names, specs)]


def markdown_table(results, fn_columns=()):
    kl_column = next(k for k in results[0] if k.startswith("kl_to_"))
    cols = [c for c in ("model", "rm_score", "gold", *fn_columns, "ended", "no_repeat", "response_length",
                        kl_column, "distinct_1", "distinct_2", "rouge_l") if c in results[0]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r[c]
            if c == "rm_score":
                cells.append(f"{v:.3f} ± {r['rm_score_sd']:.3f}")
            else:
                cells.append(v if isinstance(v, str) else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir, results, predictions, table, fn_columns=()):
    def write(tmp):
        with open(os.path.join(tmp, "predictions.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "results.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        metrics = [m for m in ("rm_score", "gold", *fn_columns, "ended", "rouge_l", "distinct_2") if m in results[0]]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
        for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
            ax.bar([r["model"] for r in results], [r[metric] for r in results],
                   yerr=[r["rm_score_sd"] for r in results] if metric == "rm_score" else None, color="#4878a8")
            ax.set_title(metric)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "results.png"), dpi=100)
        plt.close(fig)

    os.makedirs(out_dir, exist_ok=True)
    atomic_save(out_dir, write)


if __name__ == "__main__":
    run_main(main)
