"""Reward model: the pairwise loss, where the score is read, one forward for both answers, the
preference formats, bad input, and that transformers loads a saved RM and scores as nanorlhf does."""

import json
import math
import os

import pytest
import torch
from conftest import DEMO, run_script
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from nanorlhf.data import encode_answer, encode_prompt, to_pair
from nanorlhf.errors import UserError
from nanorlhf.rm import (CONFIG_FILE, SCORE_BIAS, collate_pairs, init_head, last_token_index,
                         load_reward_model, pairwise_loss, score, score_pairs)

TOL = dict(rtol=1e-5, atol=1e-4)  # scores by two computations equal in exact arithmetic, in float32


# ---------------------------------------------------------------- the maths

def test_pairwise_loss_is_mean_of_log_one_plus_exp_minus_difference():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])  # differences 1, 0, -1
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.e)) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_loss_subtracts_the_margin():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(-1.5))) / 2  # differences 1 - 1 = 0 and 2 - 0.5 = 1.5
    margin = torch.tensor([1.0, 0.5])
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)
    same_margin = (math.log(2) + math.log(1 + math.exp(-1))) / 2  # a float margin: differences 0 and 1
    assert pairwise_loss(chosen, rejected, 1.0).item() == pytest.approx(same_margin, abs=1e-6)
    assert pairwise_loss(chosen, rejected, torch.zeros(2)).item() == pairwise_loss(chosen, rejected).item()


def test_last_token_index_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


# ---------------------------------------------------------------- the preference formats

SYSTEM, HELLO, HI = "你是一位医生。", "你好", "你好！哪里不舒服？"
QUESTION, BAD = "我头疼，还发烧，怎么办？", "多喝水。"
GOOD = "可能是流感。多休息，多喝水。如果高烧不退，请就医。"
TURNS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": HELLO},
         {"role": "assistant", "content": HI}, {"role": "user", "content": QUESTION}]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in TURNS]
RECORDS = {
    "medicalgpt": {"system": SYSTEM, "history": [[HELLO, HI]], "question": QUESTION,
                   "response_chosen": GOOD, "response_rejected": BAD},
    "trl_conversational": {"prompt": TURNS, "chosen": [{"role": "assistant", "content": GOOD}],
                           "rejected": [{"role": "assistant", "content": BAD}]},
    "conversations_plus_turns": {"conversations": SHAREGPT, "chosen": {"from": "gpt", "value": GOOD},
                                 "rejected": {"from": "gpt", "value": BAD}},
    "conversations_plus_strings": {"conversations": SHAREGPT, "chosen": GOOD, "rejected": BAD},
    "whole_dialogues": {"chosen": TURNS + [{"role": "assistant", "content": GOOD}],
                        "rejected": TURNS + [{"role": "assistant", "content": BAD}]},
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_each_rm_format_gives_the_same_prompt_chosen_rejected(name):
    assert to_pair(RECORDS[name], "f.jsonl:1") == (TURNS, GOOD, BAD)


def test_trl_strings_and_medicalgpt_question_give_the_same_pair():
    trl = to_pair({"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}, "f.jsonl:1")
    medical = to_pair({"question": QUESTION, "response_chosen": GOOD, "response_rejected": BAD}, "f.jsonl:2")
    assert trl == medical == ([{"role": "user", "content": QUESTION}], GOOD, BAD)


INCOMPLETE = {
    "no_rejected": ({"prompt": QUESTION, "chosen": GOOD}, "missing field 'rejected'"),
    "no_prompt": ({"chosen": GOOD, "rejected": BAD}, "missing field 'prompt'"),
    "chosen_ends_with_user": ({"chosen": TURNS, "rejected": BAD, "prompt": QUESTION},
                              "'chosen' must end with an assistant turn"),
    "answer_not_text": ({"prompt": QUESTION, "chosen": 3, "rejected": BAD}, "'chosen' must be a string"),
}


@pytest.mark.parametrize("name", sorted(INCOMPLETE))
def test_incomplete_pair_raises_one_line_naming_where(name):
    record, message = INCOMPLETE[name]
    with pytest.raises(UserError, match=f"^f.jsonl:7: .*{message}"):
        to_pair(record, "f.jsonl:7")


def test_pair_is_encoded_in_the_sft_chat_format_and_ends_with_the_end_of_turn(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # its end of turn, <|im_end|>, is its EOS
    prompt_ids = encode_prompt(tokenizer, TURNS)
    chosen_ids = encode_answer(tokenizer, TURNS, GOOD)
    assert chosen_ids[:len(prompt_ids)] == prompt_ids and chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(chosen_ids[len(prompt_ids):-1]) == GOOD  # Chinese round-trips exactly
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- scoring in-process

@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    init_head(model)
    return model.eval(), tokenizer


def encoded_pairs(tokenizer, n=3):
    pairs = []
    with open(os.path.join(DEMO, "rm_test.jsonl"), encoding="utf-8") as f:
        for i, line in zip(range(n), f):
            prompt, chosen, rejected = to_pair(json.loads(line), f"rm_test.jsonl:{i + 1}")
            pairs.append((encode_answer(tokenizer, prompt, chosen), encode_answer(tokenizer, prompt, rejected), 0.0))
    return pairs


def padded(sequences, pad_id, side):
    width = max(len(s) for s in sequences)
    fill = [[pad_id] * (width - len(s)) for s in sequences]
    ids = [s + f if side == "right" else f + s for s, f in zip(sequences, fill)]
    mask = [[1] * len(s) + [0] * len(f) if side == "right" else [0] * len(f) + [1] * len(s)
            for s, f in zip(sequences, fill)]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def test_chosen_and_rejected_in_one_forward_equal_scoring_them_separately(tiny_rm):
    model, tokenizer = tiny_rm
    pairs = encoded_pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    chosen, rejected = score_pairs(model, batch)
    alone = [score(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
             for s in [p[0] for p in pairs] + [p[1] for p in pairs]]
    assert torch.allclose(torch.cat([chosen, rejected]), torch.tensor(alone), atol=1e-5)
    assert len(set(alone)) == len(alone)  # a head reading the same position everywhere would not pass


@torch.no_grad()
def test_score_is_the_same_for_left_and_right_padding(tiny_rm):
    model, tokenizer = tiny_rm
    sequences = [s for p in encoded_pairs(tokenizer) for s in p[:2]]
    right = score(model, *padded(sequences, tokenizer.pad_token_id, "right"))
    left = score(model, *padded(sequences, tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right, left, **TOL)


# ---------------------------------------------------------------- the real scripts

@pytest.fixture(scope="module")
def rm_files(tmp_path_factory):
    """40 demo pairs plus one with chosen == rejected and one too long; 10 held-out pairs."""
    root = tmp_path_factory.mktemp("rm_data")
    with open(os.path.join(DEMO, "rm.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    train = lines[:40] + [json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}),
                          json.dumps({"prompt": "hi", "chosen": "ok", "rejected": "word " * 300})]
    (root / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (root / "eval.jsonl").write_text("\n".join(lines[40:50]) + "\n", encoding="utf-8")
    return str(root / "train.jsonl"), str(root / "eval.jsonl")


@pytest.fixture(scope="module")
def lora_rm(tiny_model_dir, rm_files, tmp_path_factory):
    """A LoRA RM run by train_rm.py (with --normalize_scores), merged by merge_lora.py."""
    root = tmp_path_factory.mktemp("lora_rm")
    train, evals = rm_files
    proc = run_script("train_rm.py", "--model", tiny_model_dir, "--data", train, "--eval_data", evals,
                      "--output_dir", root / "run", "--max_steps", 4, "--per_device_train_batch_size", 4,
                      "--logging_steps", 1, "--eval_steps", 2, "--max_length", 200, "--learning_rate", 1e-3,
                      "--normalize_scores")
    run_script("merge_lora.py", "--base", tiny_model_dir, "--adapter", root / "run",
               "--output_dir", root / "merged")
    return proc, str(root / "run"), str(root / "merged")


@pytest.fixture(scope="module")
def full_rm(tiny_model_dir, rm_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_rm") / "run"
    run_script("train_rm.py", "--model", tiny_model_dir, "--data", rm_files[0], "--output_dir", out,
               "--finetuning_type", "full", "--max_steps", 2, "--per_device_train_batch_size", 4,
               "--max_length", 200, "--normalize_scores")
    return str(out)


@torch.no_grad()
def assert_transformers_scores_as_nanorlhf(model_dir):
    ours, tokenizer = load_reward_model(model_dir, torch.device("cpu"), torch.float32)
    theirs = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert theirs.num_labels == 1
    assert theirs.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    bias = theirs.config.nanorlhf_score_bias  # written by --normalize_scores; transformers users add it
    assert bias != 0.0
    sequences = [s for p in encoded_pairs(tokenizer, n=4) for s in p[:2]]
    for side in ("left", "right"):
        input_ids, attention_mask = padded(sequences, tokenizer.pad_token_id, side)
        hf = theirs(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0] + bias
        mine = score(ours, input_ids, attention_mask)
        torch.testing.assert_close(mine, hf, **TOL, msg=lambda m: f"{side} padding: {m}")


def test_merged_lora_rm_loads_in_transformers_and_scores_as_nanorlhf(lora_rm):
    _, run_dir, merged_dir = lora_rm
    with open(os.path.join(run_dir, CONFIG_FILE), encoding="utf-8") as f:
        bias = json.load(f)[SCORE_BIAS]
    with open(os.path.join(merged_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config[SCORE_BIAS] == bias
    assert_transformers_scores_as_nanorlhf(merged_dir)


def test_full_rm_dir_loads_in_transformers_and_scores_as_nanorlhf(full_rm):
    assert_transformers_scores_as_nanorlhf(full_rm)


@torch.no_grad()
def test_normalized_rm_gives_training_chosen_answers_mean_0_std_1(lora_rm, rm_files):
    model, tokenizer = load_reward_model(lora_rm[2], torch.device("cpu"), torch.float32)
    with open(rm_files[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f.read().splitlines()[:40]]  # the pairs it kept
    chosen = []
    for i, rec in enumerate(records):
        prompt, answer, _ = to_pair(rec, f"train.jsonl:{i + 1}")
        chosen.append(encode_answer(tokenizer, prompt, answer))
    scores = score(model, *padded(chosen, tokenizer.pad_token_id, "right"))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-3)


def test_rm_run_logs_training_and_eval_metrics(lora_rm):
    _, run_dir, _ = lora_rm
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "accuracy", "lr", "chosen_score", "rejected_score", "margin"} <= row.keys()
        assert row["margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"], abs=1e-5)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]  # every --eval_steps and at the end
    assert 0.0 <= rows[-1]["eval/accuracy"] <= 1.0 and rows[-1]["eval/loss"] > 0


def test_identical_and_too_long_pairs_are_dropped_with_one_warning_each(lora_rm):
    proc, _, _ = lora_rm
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("1 pairs with chosen == rejected were dropped" in w and "train.jsonl:41" in w
               for w in warnings)
    assert any("1 pairs longer than --max_length 200 tokens were dropped" in w for w in warnings)
    assert "40 training pairs, 10 evaluation pairs" in proc.stderr


def test_lora_adapter_saves_the_score_head_as_modules_to_save(lora_rm):
    _, run_dir, _ = lora_rm
    with open(os.path.join(run_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]


BAD_INPUT = {
    "malformed_json": (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": '],
                       ":2: malformed JSON"),
    "missing_rejected": (['{"prompt": "a", "chosen": "b", "rejected": "c"}',
                          '{"prompt": "a", "chosen": "b"}'], ":2: missing field 'rejected'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_pair_fails_with_one_line_naming_file_and_line(name, tiny_model_dir, tmp_path):
    lines, message = BAD_INPUT[name]
    data, out = tmp_path / "bad.jsonl", tmp_path / "out"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_script("train_rm.py", "--model", tiny_model_dir, "--data", data, "--output_dir", out,
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"{data}{message}" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
