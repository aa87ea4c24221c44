"""data/real: the arithmetic task with a checkable answer is its script's output, byte for byte; its splits
share no problem; every record is a prompt train_ppo.py reads, with the right answer for accuracy."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT

from nanorlhf.data import prompt_messages, read_records
from nanorlhf.rewards import accuracy, numbers

REAL = os.path.join(ROOT, "data", "real")
SPLITS = ("arith_train.jsonl", "arith_test.jsonl")


def load(name):
    with open(os.path.join(REAL, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_make_arith_reproduces_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(REAL, "make_arith.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in (*SPLITS, "arith_sft.jsonl"):
        with open(os.path.join(REAL, name), "rb") as committed:
            assert (tmp_path / name).read_bytes() == committed.read(), name


def test_the_splits_share_no_problem_in_any_phrasing():
    def problems(name):
        return [(r["op"], *numbers(r["question"])) for r in load(name)]

    train, test = problems("arith_train.jsonl"), problems("arith_test.jsonl")
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert not {r["question"] for r in load("arith_train.jsonl")} & {r["question"] for r in load("arith_test.jsonl")}


def test_the_sft_answers_work_each_training_question_out_and_earn_the_accuracy_reward():
    train, sft = load("arith_train.jsonl"), load("arith_sft.jsonl")
    assert [d["messages"][0]["content"] for d in sft] == [r["question"] for r in train]
    for rec, dialogue in zip(train, sft):
        user, assistant = dialogue["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        a, op, b, eq, result = assistant["content"].split(" ")  # "23 + 45 = 68"
        assert (op, eq, result) == ({"sum": "+", "difference": "-"}[rec["op"]], "=", rec["answer"])
        assert sorted([int(a), int(b)]) == sorted(numbers(rec["question"]))
        assert accuracy(rec["question"], assistant["content"], **rec) == 1.0


@pytest.mark.parametrize("name, per_kind", [("arith_train.jsonl", 25), ("arith_test.jsonl", 6)])
def test_every_kind_is_there_equally(name, per_kind):
    kinds = Counter((r["op"], r["level"], r["phrasing"]) for r in load(name))
    assert len(kinds) == 2 * 3 * 4 and set(kinds.values()) == {per_kind}


@pytest.mark.parametrize("name", SPLITS)
def test_every_answer_is_the_sum_or_difference_of_the_questions_two_numbers(name):
    for r in load(name):
        a, b = sorted(numbers(r["question"]), reverse=True)  # "Subtract 13 from 20" names b first
        assert int(r["answer"]) == (a + b if r["op"] == "sum" else a - b) >= 0, r
        assert int(r["answer"]) not in (a, b), r  # an answer that restates the question stays one number


@pytest.mark.parametrize("name", SPLITS)
def test_every_record_is_a_prompt_and_its_answer_earns_the_accuracy_reward(name):
    for where, rec in read_records(os.path.join(REAL, name)):
        messages = prompt_messages(rec, where)
        assert messages == [{"role": "user", "content": rec["question"]}]
        fields = {k: v for k, v in rec.items() if k != "question"}  # what train_ppo.py hands the function
        prompt = messages[-1]["content"]
        assert accuracy(prompt, rec["answer"], **fields) == 1.0
        assert accuracy(prompt, f"The answer is {rec['answer']}.", **fields) == 1.0
        other = next(n for n in range(int(rec["answer"]) + 1, 10_000) if n not in numbers(prompt))
        assert accuracy(prompt, f"{rec['answer']} or {other}", **fields) == 0.0


def test_the_files_are_small():
    assert sum(os.path.getsize(os.path.join(REAL, name)) for name in SPLITS) < 200_000
