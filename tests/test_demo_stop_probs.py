"""scripts/demo_stop_probs.py: P(end of turn) after the advice and after the doctor sentence of a reference."""

import json
import os
import sys

import pytest
import torch
from conftest import DEMO, ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from demo_stop_probs import end_probability, stop_probs  # noqa: E402

from nanorlhf.data import read_records  # noqa: E402
from nanorlhf.errors import UserError  # noqa: E402
from nanorlhf.evaluate import load_policy  # noqa: E402
from nanorlhf.rubric import load_world  # noqa: E402
from nanorlhf.template import end_of_turn  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer, model = load_policy(tiny_model_dir, torch.device("cpu"), torch.float32)
    return tokenizer, model


def by_hand(model, tokenizer, prompt, answer):
    """The chat template's text up to and including the end-of-turn marker, tokenized, one full forward:
    the softmax at the position before the marker, read at the marker's id."""
    marker, marker_id, _ = end_of_turn(tokenizer)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    text = text[:text.index(answer) + len(answer)] + marker
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[-1] == marker_id
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -2].softmax(-1)[marker_id].item()


def test_both_places_match_a_forward_over_the_template_text(tiny):
    tokenizer, model = tiny
    records = read_records(os.path.join(DEMO, "test.jsonl"))
    en = next(r for r in records if r[1]["lang"] == "en")
    zh = next(r for r in records if r[1]["lang"] == "zh")
    world = {c["id"]: c for c in load_world(os.path.join(DEMO, "world.json"))["conditions"]}
    rows = stop_probs(model, tokenizer, [en, zh], world)
    for (_, rec), row in zip([en, zh], rows, strict=True):
        doctor = world[rec["condition"]][f"doctor_{rec['lang']}"]
        advice_cut = rec["reference"][:-len(doctor)].rstrip()
        assert advice_cut.endswith(world[rec["condition"]][f"advice_{rec['lang']}"])
        hand = {"after_doctor": by_hand(model, tokenizer, rec["prompt"], rec["reference"]),
                "after_advice": by_hand(model, tokenizer, rec["prompt"], advice_cut)}
        assert row["after_doctor"] == pytest.approx(hand["after_doctor"], rel=1e-5)
        assert row["after_advice"] == pytest.approx(hand["after_advice"], rel=1e-5)
        assert 0 < row["after_advice"] < 1 and 0 < row["after_doctor"] < 1
    # the same function on one answer: not the other place's value
    assert end_probability(model, tokenizer, [{"role": "user", "content": en[1]["prompt"]}],
                           en[1]["reference"]) == pytest.approx(rows[0]["after_doctor"], rel=1e-6)


def test_a_record_without_a_reference_is_one_line_naming_it(tiny):
    tokenizer, model = tiny
    world = {c["id"]: c for c in load_world(os.path.join(DEMO, "world.json"))["conditions"]}
    bad = [("prompts.jsonl:3", {"prompt": "I have a runny nose.", "condition": "common_cold", "lang": "en"})]
    with pytest.raises(UserError, match=r"^prompts.jsonl:3: needs a condition, a lang and a reference"):
        stop_probs(model, tokenizer, bad, world)


def test_the_script_prints_one_json_line_per_model(tiny_model_dir, tmp_path):
    data = tmp_path / "two.jsonl"
    lines = open(os.path.join(DEMO, "test.jsonl"), encoding="utf-8").read().splitlines()[:2]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_script("scripts/demo_stop_probs.py", f"a={tiny_model_dir}", "--data", data)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["a"]
    assert set(rows[0]) == {"model", "end_after_advice", "end_after_doctor"}
    assert rows[0]["end_after_doctor"]["min_prompt"] in [json.loads(line)["prompt"] for line in lines]
    proc = run_script("scripts/demo_stop_probs.py", "no-equals-sign", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no-equals-sign: expected NAME=DIR"
