"""Build a task with a checkable answer: arithmetic questions, judged by a program, not a reward model.

    python data/real/make_arith.py [--out data/real]

Sums and differences in four phrasings and three levels, as MedicalGPT's GRPO records
{"question", "answer"}; the answer is the number, which nanorlhf.rewards:accuracy compares as a number:

    arith_train.jsonl   600 records (25 for each of the 24 kinds)
    arith_test.jsonl    144 held-out records (6 for each kind), every phrasing and level mixed
    arith_sft.jsonl     the training questions answered as a teacher would, the sum written out ("23 + 45 = 68"),
                        as {"messages"} dialogues for train_sft.py: the SFT stage of make real

Each record also says what kind it is, so results can be broken down by it (reward functions get these
fields too, and ignore them):
    op        "sum" | "difference" (never negative)
    level     1: numbers 1-20, 2: two digits, 3: three digits
    phrasing  "plain" ("What is 23 + 45? Answer with just the number."), "words" ("Calculate 87 - 29."),
              "story" (a short word problem), "zh" (the same in Chinese)

A problem (op, a, b) is in one split only, in any phrasing, so the held-out questions are new sums, not
new wordings of ones seen in training. A difference never equals one of its own numbers (90 - 45): an
answer that restates the question and then the result stays one unambiguous number.

    python train_ppo.py --sft SFT --reward_fn nanorlhf.rewards:accuracy --data data/real/arith_train.jsonl ...
    python -m nanorlhf.evaluate sft=SFT ppo=PPO --data data/real/arith_test.jsonl --reward_fn nanorlhf.rewards:accuracy

Deterministic: one random.Random per split, fixed seeds, stable ordering; running it twice gives
byte-identical files, and the committed files are its output.
"""
import argparse
import json
import random
from pathlib import Path

SEED = 20240624
N_TRAIN, N_TEST = 25, 6  # records per kind (op x level x phrasing)
LEVELS = {1: (1, 20), 2: (10, 99), 3: (100, 999)}  # the range both numbers are drawn from

NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia"]
NAMES_ZH = ["小明", "小红", "小刚", "小丽"]
TEMPLATES = {
    ("sum", "plain"): ["What is {a} + {b}? Answer with just the number.", "{a} + {b} = ?"],
    ("difference", "plain"): ["What is {a} - {b}? Answer with just the number.", "{a} - {b} = ?"],
    ("sum", "words"): ["Calculate {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    ("difference", "words"): ["Calculate {a} - {b}.", "Subtract {b} from {a}.",
                              "What is the difference between {a} and {b}?"],
    ("sum", "story"): [
        "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
        "A library has {a} books and receives {b} new ones. How many books does it have now?",
        "{name} walked {a} steps in the morning and {b} steps in the evening. How many steps is that in total?"],
    ("difference", "story"): [
        "{name} has {a} apples and gives {b} to a friend. How many apples does {name} have left?",
        "A bus carries {a} people. At the next stop {b} get off. How many people are still on the bus?",
        "A shop had {a} cakes and sold {b} of them. How many cakes are left?"],
    ("sum", "zh"): ["{a} 加 {b} 等于多少？", "计算：{a} + {b}",
                    "{name_zh}有{a}个苹果，又买了{b}个。{name_zh}现在一共有多少个苹果？"],
    ("difference", "zh"): ["{a} 减 {b} 等于多少？", "计算：{a} - {b}",
                           "书架上有{a}本书，借走了{b}本。书架上还剩多少本书？"],
}
KINDS = [(op, level, phrasing) for op in ("sum", "difference") for level in LEVELS
         for phrasing in ("plain", "words", "story", "zh")]


def draw_problem(rng, op, level):
    """Two numbers of the level; a difference is a - b with a > b and a - b != b."""
    low, high = LEVELS[level]
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if op == "sum":
            return a, b, a + b
        a, b = max(a, b), min(a, b)
        if a - b not in (0, b):
            return a, b, a - b


def worked(op, a, b, result):
    """The answer a teacher writes: the sum or difference written out, then its result ("23 + 45 = 68")."""
    return f"{a} {'+' if op == 'sum' else '-'} {b} = {result}"


def make_split(rng, per_kind, taken):
    """per_kind records of every kind, each a problem not in `taken` (which it extends), and each record's
    worked answer (a list in the same order)."""
    records = []
    for op, level, phrasing in KINDS:
        for _ in range(per_kind):
            a, b, result = draw_problem(rng, op, level)
            while (op, a, b) in taken:
                a, b, result = draw_problem(rng, op, level)
            taken.add((op, a, b))
            template = rng.choice(TEMPLATES[op, phrasing])
            question = template.format(a=a, b=b, name=rng.choice(NAMES), name_zh=rng.choice(NAMES_ZH))
            records.append(({"question": question, "answer": str(result), "op": op, "level": level,
                             "phrasing": phrasing}, worked(op, a, b, result)))
    rng.shuffle(records)
    return [r for r, _ in records], [w for _, w in records]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    taken = set()  # the held-out split draws first, so it never depends on the training split
    test, _ = make_split(random.Random(SEED + 1), N_TEST, taken)
    train, answers = make_split(random.Random(SEED + 2), N_TRAIN, taken)
    sft = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": w}]}
           for r, w in zip(train, answers)]
    splits = {"arith_test": test, "arith_train": train, "arith_sft": sft}
    for split, records in splits.items():
        write_lines(out / f"{split}.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
    total = sum((out / f"{split}.jsonl").stat().st_size for split in splits)
    assert total < 200_000, f"the arithmetic data is {total} bytes; keep it under 200 kB"
    print(f"wrote {', '.join(f'{s}.jsonl ({len(r)})' for s, r in splits.items())} to {out} ({total / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
