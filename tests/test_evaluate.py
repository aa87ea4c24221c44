"""nanorlhf.evaluate: the text metrics by hand, and an evaluation that gives answers room to end."""

import json
import os

import pytest
from conftest import DEMO, ROOT

from nanorlhf import ablate, evaluate
from nanorlhf.errors import UserError
from nanorlhf.evaluate import distinct_n, reward_fn_columns, rouge_l, units
from nanorlhf.rewards import accuracy
from nanorlhf.rubric import has_repeat


def test_units_are_chinese_characters_and_lowercased_words():
    assert units("Rest, drink 水！OK") == ["rest", "drink", "水", "ok"]


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    # prediction a b c d, reference a c d e: LCS a c d = 3, precision 3/4, recall 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("多喝水", "多休息，多喝水") == pytest.approx(2 * (3 / 3) * (3 / 6) / (3 / 3 + 3 / 6))
    assert rouge_l("", "a") == 0.0 and rouge_l("x", "y") == 0.0


def test_distinct_n_counts_unique_ngrams_over_all_answers():
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)


def test_has_repeat_finds_a_repeated_sentence_or_4_gram():
    assert has_repeat("Rest. Drink water. Rest.")
    assert has_repeat("rest and drink plenty of fluids, rest and drink plenty more")
    assert has_repeat("多休息多喝水。多休息多喝水")
    assert not has_repeat("This sounds like a cold. Rest and drink plenty of fluids.")


def test_answers_get_room_to_end_by_default_here_and_in_the_ablation_runner():
    args = evaluate.build_parser().parse_args(["sft=some/dir"])
    assert args.max_new_tokens == evaluate.MAX_NEW_TOKENS >= 256
    assert ablate.build_parser().parse_args(["--sft", "s", "--rm", "r", "--data", "d"]).eval_max_new_tokens \
        == evaluate.MAX_NEW_TOKENS


@pytest.mark.slow
def test_evaluation_reports_the_share_of_answers_that_ended(tiny_model_dir, rm_dir, tmp_path):
    data = tmp_path / "test.jsonl"
    with open(os.path.join(DEMO, "test.jsonl"), encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:4]), encoding="utf-8")
    out = tmp_path / "eval"
    evaluate.main([f"sft={tiny_model_dir}", "--rm", rm_dir, "--data", str(data), "--output_dir", str(out),
                   "--max_new_tokens", "20"])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 4
    assert results[0]["ended"] == pytest.approx(sum(p["ended"] for p in predictions) / 4)
    assert results[0]["no_repeat"] == pytest.approx(sum(not has_repeat(p["response"]) for p in predictions) / 4)
    header = (out / "results.md").read_text(encoding="utf-8").splitlines()[0]
    assert "| ended | no_repeat |" in header


def test_a_reward_function_column_is_named_by_its_function_unless_the_name_is_taken():
    assert reward_fn_columns(["nanorlhf.rewards:accuracy", "my.py:brevity"]) == ["accuracy", "brevity"]
    assert reward_fn_columns(["a.py:score", "b.py:score"]) == ["a.py:score", "b.py:score"]
    assert reward_fn_columns(["nanorlhf.rewards:gold"]) == ["nanorlhf.rewards:gold"]  # the rubric's column


def test_a_reward_function_that_cannot_be_loaded_stops_evaluate_before_any_model_loads():
    with pytest.raises(UserError, match="--reward_fn 'accuracy': expected FILE.py:NAME or package.module:NAME"):
        evaluate.main(["sft=no/such/dir", "--reward_fn", "accuracy"])


@pytest.mark.slow
def test_reward_functions_judge_question_records_a_column_each(tiny_model_dir, tmp_path):
    data = tmp_path / "arith.jsonl"
    with open(os.path.join(ROOT, "data", "real", "arith_test.jsonl"), encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:4]), encoding="utf-8")
    (tmp_path / "mine.py").write_text("def chars(prompt, response, answer, scale=1, **fields):\n"
                                      "    return scale * len(response)\n", encoding="utf-8")
    out = tmp_path / "eval"
    # two models of one pipeline (the tiny one's template is ChatML), no reward model, no demo world
    evaluate.main([f"sft={tiny_model_dir}", f"again={tiny_model_dir}", "--data", str(data), "--output_dir", str(out),
                   "--max_new_tokens", "8", "--reward_fn", f"nanorlhf.rewards:accuracy,{tmp_path / 'mine.py'}:chars",
                   "--reward_fn_kwargs", '{"scale": 2}'])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert [r["model"] for r in results] == ["sft", "again"] and len(predictions) == 8
    for pred, rec in zip(predictions, records + records):
        assert pred["prompt"] == rec["question"]  # what the reward function was handed
        assert pred["accuracy"] == accuracy(rec["question"], pred["response"], **rec)
        assert pred["chars"] == 2 * len(pred["response"])
    for row in results:
        preds = [p for p in predictions if p["model"] == row["model"]]
        assert row["accuracy"] == pytest.approx(sum(p["accuracy"] for p in preds) / 4)
        assert row["chars"] == pytest.approx(sum(p["chars"] for p in preds) / 4)
        assert {"ended", "response_length", "kl_to_sft"} <= set(row) and "gold" not in row and "rm_score" not in row
    assert results[1]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)  # the same weights as the reference
    header = (out / "results.md").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("| model | accuracy | chars | ended |")
