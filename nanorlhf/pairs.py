"""Preference pairs a model makes itself: sample several answers to questions whose answer a program can check,
judge each, and prefer a right answer over a wrong one.

    python -m nanorlhf.pairs --model runs/models/smollm2-135m-instruct --data data/real/arith_train.jsonl \\
        --output_dir runs/real/seed-1/pairs --questions 256 --eval_questions 32 --samples 4 --seed 1

--questions records of --data are drawn (shuffled by --seed; 0 = all of them, in a shuffled order), and each gets
--samples answers at --temperature, at most --max_new_tokens long, judged by --reward_fn (the same functions
train_ppo.py and evaluate take; default nanorlhf.rewards:accuracy). An answer is right when it scores at least
--threshold AND ended (its end-of-turn token came before --max_new_tokens); every other answer is wrong. A
question with both gives up to --pairs_per_question pairs {"prompt", "chosen", "rejected"} (a right answer over a
wrong one, no answer text twice), the format train_rm.py and train_dpo.py read. The last --eval_questions
questions drawn are held out: their pairs go to eval.jsonl (the reward model's held-out accuracy), so no
question is in both files. The output dir gets:

    train.jsonl    the pairs of the other questions (train_rm.py / train_dpo.py --data)
    eval.jsonl     the pairs of the held-out questions (--eval_data)
    sft.jsonl      one right answer to each training question that got one (rejection sampling: train_sft.py)
    samples.jsonl  every answer sampled, with its score, whether it ended and whether it counted as right
    stats.json     how many questions yielded a pair, the share of right answers, ...

The same --seed (and thread count) gives the same files.
"""

import json
import os
import random
import statistics

import torch

from nanorlhf.args import SEED_RANGE, ArgumentParser, pick_device
from nanorlhf.data import encode_prompt, prompt_messages, read_records
from nanorlhf.errors import UserError, run_main
from nanorlhf.evaluate import load_policy
from nanorlhf.files import atomic_save
from nanorlhf.loading import check_model_dir
from nanorlhf.metrics import info
from nanorlhf.rewards import compute_rewards, load_reward_fns
from nanorlhf.sampling import decode_responses, ended_with_eos, generate
from nanorlhf.template import stop_ids


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model that answers (a model dir or a .gguf file)")
    parser.add_argument("--data", required=True, help="questions: prompt records with the fields the judge reads "
                        "(e.g. {\"question\", \"answer\"})")
    parser.add_argument("--output_dir", required=True, help="where the pair files go")
    parser.add_argument("--reward_fn", default="nanorlhf.rewards:accuracy", help="the judge: FILE.py:NAME or "
                        "package.module:NAME, comma-separated (summed)")
    parser.add_argument("--reward_fn_kwargs", default="", help="JSON object of keyword arguments for the judge")
    parser.add_argument("--threshold", type=float, default=1.0, range="any",
                        help="an ended answer that scores at least this is right")
    parser.add_argument("--allow_unended", action="store_true",
                        help="an answer cut at --max_new_tokens may be right too (by default it is wrong: it never "
                        "said it was done)")
    parser.add_argument("--questions", type=int, default=0, range=">=0", help="questions drawn (0 = all)")
    parser.add_argument("--eval_questions", type=int, default=0, range=">=0",
                        help="the last N questions drawn: their pairs go to eval.jsonl")
    parser.add_argument("--samples", type=int, default=4, range=">1", help="answers sampled per question")
    parser.add_argument("--pairs_per_question", type=int, default=1, range=">0",
                        help="at most this many pairs from one question")
    parser.add_argument("--temperature", type=float, default=1.0, range=">0", help="sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=32, range=">0",
                        help="an answer still going at this length did not end (and is wrong)")
    parser.add_argument("--batch_size", type=int, default=32, range=">0", help="answers sampled at once")
    parser.add_argument("--seed", type=int, default=42, range=SEED_RANGE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the model's weights while sampling (auto: bf16 on CUDA, fp32 on a CPU)")
    return parser


def draw_questions(records, n, seed):
    """n records (all when n is 0) in an order shuffled by seed: [(where, record)]."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:n or len(order)]]


def sample_answers(model, tokenizer, questions, samples, args):
    """`samples` answers to each question, question-major: [{"prompt", "response", "ended"}] (len(questions) *
    samples of them), sampled in batches of args.batch_size answers."""
    eos_ids = stop_ids(tokenizer, model)
    prompts = []
    for where, rec in questions:
        messages = prompt_messages(rec, where)
        prompts += [(messages[-1]["content"], encode_prompt(tokenizer, messages, where))] * samples
    answers = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        batch = generate(model, [ids for _, ids in chunk], args.max_new_tokens, eos_ids, tokenizer.pad_token_id,
                         args.temperature)
        ended = ended_with_eos(batch["response"], eos_ids).tolist()
        answers += [{"prompt": text, "response": response, "ended": end}
                    for (text, _), response, end in zip(chunk, decode_responses(tokenizer, batch), ended)]
        info(f"sampled {len(answers)} of {len(prompts)} answers")
    return answers


def pairs_of(prompt, right, wrong, rng, limit):
    """Up to `limit` pairs {"prompt", "chosen", "rejected"} from the distinct right and wrong answer texts of one
    question, drawn by rng; no text is used twice."""
    right, wrong = sorted(set(right)), sorted(set(wrong))
    rng.shuffle(right)
    rng.shuffle(wrong)
    return [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in zip(right, wrong)][:limit]


def make_pairs(questions, answers, scores, samples, args):
    """Judge and pair: (train pairs, eval pairs, sft records, samples records, stats). answers and scores are
    question-major, `samples` per question; the last args.eval_questions questions are held out."""
    rng = random.Random(args.seed)

    def is_right(answer, score):
        return (answer["ended"] or args.allow_unended) and score >= args.threshold

    n_train = len(questions) - args.eval_questions
    train, evals, sft, records = [], [], [], []
    yielded = {"train": 0, "eval": 0}
    for q, (where, rec) in enumerate(questions):
        mine = list(zip(answers[q * samples:(q + 1) * samples], scores[q * samples:(q + 1) * samples]))
        right = [a["response"] for a, s in mine if is_right(a, s)]
        wrong = [a["response"] for a, s in mine if not is_right(a, s)]
        records += [{**a, "score": s, "right": is_right(a, s), "where": where} for a, s in mine]
        pairs = pairs_of(mine[0][0]["prompt"], right, wrong, rng, args.pairs_per_question)
        (train if q < n_train else evals).extend(pairs)
        yielded["train" if q < n_train else "eval"] += bool(pairs)
        if right and q < n_train:
            sft.append({"messages": [{"role": "user", "content": mine[0][0]["prompt"]},
                                     {"role": "assistant", "content": rng.choice(sorted(set(right)))}]})
    stats = {"questions": len(questions), "eval_questions": args.eval_questions, "samples_per_question": samples,
             "right_needs_end": not args.allow_unended,
             "right": statistics.mean(r["right"] for r in records),
             "ended": statistics.mean(r["ended"] for r in records),
             "questions_with_a_pair": yielded["train"] + yielded["eval"],
             "train_questions_with_a_pair": yielded["train"], "eval_questions_with_a_pair": yielded["eval"],
             "all_right": sum(all(r["right"] for r in records[q * samples:(q + 1) * samples])
                              for q in range(len(questions))),
             "all_wrong": sum(not any(r["right"] for r in records[q * samples:(q + 1) * samples])
                              for q in range(len(questions))),
             "train_pairs": len(train), "eval_pairs": len(evals), "sft_answers": len(sft)}
    return train, evals, sft, records, stats


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_model_dir(args.model)
    reward_fns = load_reward_fns(args.reward_fn, args.reward_fn_kwargs)
    questions = draw_questions(read_records(args.data), args.questions, args.seed)
    if args.eval_questions >= len(questions):
        raise UserError(f"--eval_questions {args.eval_questions} leaves no training question of the "
                        f"{len(questions)} drawn from {args.data}")
    device, dtype = pick_device(args.device, args.dtype)
    tokenizer, model = load_policy(args.model, device, dtype)
    torch.manual_seed(args.seed)
    info(f"{len(questions)} questions x {args.samples} answers (temperature {args.temperature}, at most "
         f"{args.max_new_tokens} tokens), judged by {args.reward_fn}")
    answers = sample_answers(model, tokenizer, questions, args.samples, args)
    scores = compute_rewards(reward_fns, [a["prompt"] for a in answers], [a["response"] for a in answers],
                             [rec for _, rec in questions for _ in range(args.samples)],
                             [where for where, _ in questions for _ in range(args.samples)])
    train, evals, sft, records, stats = make_pairs(questions, answers, scores, args.samples, args)
    if not train:
        raise UserError(f"no training question got both a right and a wrong answer in {args.samples} samples; "
                        "sample more (--samples, --questions) or change --temperature")

    def write(tmp):
        write_jsonl(os.path.join(tmp, "train.jsonl"), train)
        write_jsonl(os.path.join(tmp, "eval.jsonl"), evals)
        write_jsonl(os.path.join(tmp, "sft.jsonl"), sft)
        write_jsonl(os.path.join(tmp, "samples.jsonl"), records)
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)

    atomic_save(args.output_dir, write)
    info(f"{stats['questions_with_a_pair']} of {stats['questions']} questions yielded a pair (right and wrong "
         f"among {args.samples} answers; {stats['all_right']} all right, {stats['all_wrong']} all wrong); "
         f"{stats['right']:.3f} of the answers were right. {len(train)} training pairs, {len(evals)} held out, "
         f"{len(sft)} right answers for SFT -> {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    run_main(main)
