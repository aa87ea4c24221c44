"""The built-in demo world: the generator is deterministic, the splits are clean, the rubric is exact."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanorlhf.rubric import gold_score, load_world

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
SCRIPT = DEMO / "make_demo.py"
OUTPUTS = ["world.json", "pt.txt", "sft.jsonl", "sft_alpaca.jsonl", "rm.jsonl", "rm_test.jsonl",
           "ppo.jsonl", "grpo.jsonl", "test.jsonl"]
JSONL = [name for name in OUTPUTS if name.endswith(".jsonl")]
HANZI = re.compile(r"[\u4e00-\u9fff]")


def read_jsonl(name):
    with open(DEMO / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def first_user_turn(split, record):
    if split == "sft.jsonl":
        return next(t["value"] for t in record["conversations"] if t["from"] == "human")
    if split == "sft_alpaca.jsonl":
        return record["input"] or record["instruction"]
    return record["question"] if split == "grpo.jsonl" else record["prompt"]


@pytest.fixture(scope="module")
def world():
    return load_world(DEMO / "world.json")


# ---- the generator ------------------------------------------------------------------------------
def test_script_is_deterministic_and_the_committed_files_are_its_output(tmp_path):
    for run in ("a", "b"):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / run)], check=True,
                       capture_output=True)
    for name in OUTPUTS:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), f"{name} differs between two runs"
        assert first == (DEMO / name).read_bytes(), f"data/demo/{name} is not what make_demo.py writes"


def test_the_demo_folder_is_under_one_and_a_half_megabytes():
    assert sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file()) < 1_500_000


# ---- the files ----------------------------------------------------------------------------------
def test_every_record_parses_and_has_its_fields():
    for rec in read_jsonl("sft.jsonl"):
        turns = rec["conversations"]
        roles = [t["from"] for t in turns if t["from"] != "system"]
        assert roles[0] == "human" and roles[-1] == "gpt" and len(roles) % 2 == 0
        assert all(t["value"] for t in turns)
    for rec in read_jsonl("sft_alpaca.jsonl"):
        assert set(rec) == {"instruction", "input", "output"} and rec["instruction"] and rec["output"]
    for name in ("rm.jsonl", "rm_test.jsonl"):
        for rec in read_jsonl(name):
            assert rec["prompt"] and rec["chosen"] and rec["rejected"] and rec["chosen"] != rec["rejected"]
    for rec in read_jsonl("ppo.jsonl"):
        assert rec["prompt"]
    for rec in read_jsonl("test.jsonl"):
        assert rec["prompt"] and rec["reference"] and rec["lang"] in ("en", "zh") and rec["condition"]
    world = {c["id"]: c for c in load_world(DEMO / "world.json")["conditions"]}
    for ppo, grpo in zip(read_jsonl("ppo.jsonl"), read_jsonl("grpo.jsonl"), strict=True):
        # the same prompts, as question/answer: the answer is a word of the case's doctor sentence
        assert grpo["question"] == ppo["prompt"] and grpo["condition"] == ppo["condition"]
        assert grpo["answer"] in world[grpo["condition"]][f"doctor_{grpo['lang']}"]
    lines = (DEMO / "pt.txt").read_text(encoding="utf-8").splitlines()
    assert 1500 <= len(lines) <= 3000 and all(line.strip() for line in lines)


def test_split_sizes():
    sizes = {name: len(read_jsonl(name)) for name in JSONL}
    assert 600 <= sizes["sft.jsonl"] <= 1000 and 1200 <= sizes["rm.jsonl"] <= 2000
    assert sizes["sft_alpaca.jsonl"] == 50 and sizes["rm_test.jsonl"] == 150
    assert sizes["ppo.jsonl"] == sizes["grpo.jsonl"] == 300 and sizes["test.jsonl"] == 60


def test_sft_has_system_turns_and_some_multi_turn_dialogues():
    records = read_jsonl("sft.jsonl")
    with_system = sum(r["conversations"][0]["from"] == "system" for r in records)
    multi_turn = sum(sum(t["from"] == "human" for t in r["conversations"]) > 1 for r in records)
    assert 0 < with_system < len(records) // 10
    assert 0.05 * len(records) < multi_turn < 0.15 * len(records)


def test_prompts_do_not_overlap_between_splits_or_repeat_within_one():
    seen = {}
    for name in ("sft.jsonl", "sft_alpaca.jsonl", "rm.jsonl", "rm_test.jsonl", "ppo.jsonl", "test.jsonl"):
        for rec in read_jsonl(name):
            prompt = first_user_turn(name, rec)
            assert prompt not in seen, f"{prompt!r} is in both {seen[prompt]} and {name}"
            seen[prompt] = name


def test_chinese_text_is_present_and_round_trips():
    for name in JSONL:
        raw = (DEMO / name).read_text(encoding="utf-8")
        assert HANZI.search(raw) and "\\u" not in raw, f"{name} should hold Chinese as plain UTF-8"
        for line in raw.splitlines():
            assert json.dumps(json.loads(line), ensure_ascii=False) == line
    assert HANZI.search((DEMO / "pt.txt").read_text(encoding="utf-8"))
    test = read_jsonl("test.jsonl")
    assert sum(r["lang"] == "zh" for r in test) == sum(r["lang"] == "en" for r in test)


def test_sft_answers_are_mostly_short():
    # most answers leave out when to see a doctor; about FULLER_SFT_SHARE (15%) say it, so PPO has
    # a fuller answer it can sometimes sample and reinforce
    answers = [turn["value"] for rec in read_jsonl("sft.jsonl") for turn in rec["conversations"]
               if turn["from"] == "gpt"]
    fuller = sum("doctor" in a or "就医" in a for a in answers)
    assert 0.10 <= fuller / len(answers) <= 0.20
    for rec in read_jsonl("sft_alpaca.jsonl"):
        assert "doctor" not in rec["output"] and "就医" not in rec["output"]


# ---- the rubric ---------------------------------------------------------------------------------
FULL_EN = ("This sounds like a common cold. Rest and drink plenty of fluids. "
           "See a doctor if it lasts more than ten days.")
FULL_ZH = "听起来像是普通感冒。多休息，多喝水。如果症状超过十天，请就医。"


def test_full_correct_answer_scores_one(world):
    for answer in (FULL_EN, FULL_ZH):
        assert gold_score(answer, "common_cold", world) == {
            "condition": 1, "advice": 1, "doctor": 1, "no_wrong": 1, "no_repeat": 1, "total": 1.0}


def test_short_sft_answer_misses_only_the_doctor(world):
    short = ["This sounds like a common cold. Rest and drink plenty of fluids.", "听起来像是普通感冒。多休息，多喝水。"]
    for answer in short:
        score = gold_score(answer, "common_cold", world)
        assert score["doctor"] == 0 and score["total"] == pytest.approx(0.8)


def test_wrong_condition_scores_zero_on_condition_and_no_wrong(world):
    en = ("This sounds like influenza. Stay home, rest and take fever medicine. "
          "See a doctor if you have trouble breathing.")
    zh = "听起来像是流感。在家休息，服用退烧药。如果呼吸困难，请就医。"
    for answer in (en, zh):
        score = gold_score(answer, "common_cold", world)
        assert score == {"condition": 0, "advice": 0, "doctor": 0, "no_wrong": 0, "no_repeat": 1,
                         "total": pytest.approx(0.2)}


def test_naming_two_conditions_loses_no_wrong(world):
    score = gold_score("It is a common cold or the flu. Rest and fluids.", "common_cold", world)
    assert score["condition"] == 1 and score["no_wrong"] == 0
    assert gold_score("可能是普通感冒，也可能是流感。", "common_cold", world)["no_wrong"] == 0


def test_repeated_sentence_or_ngram_loses_no_repeat(world):
    repeated = [
        "This sounds like a common cold. Rest and drink plenty of fluids. Rest and drink plenty of fluids.",
        "This sounds like a common cold, rest and drink plenty of fluids, rest and drink plenty of fluids",
        "听起来像是普通感冒。多休息，多喝水。多休息，多喝水。",
        "听起来像是普通感冒，多休息，多喝水多喝水多喝水",
    ]
    for answer in repeated:
        score = gold_score(answer, "common_cold", world)
        assert score["no_repeat"] == 0 and score["condition"] == 1 and score["advice"] == 1


def test_english_matches_whole_words_only(world):
    assert gold_score("Drink plenty of fluids.", "influenza", world)["no_wrong"] == 1  # 'flu' in 'fluids'
    assert gold_score("THIS SOUNDS LIKE A COMMON COLD.", "common_cold", world)["condition"] == 1


def test_empty_answer_and_unknown_condition(world):
    assert gold_score("", "common_cold", world)["total"] == pytest.approx(0.4)
    with pytest.raises(KeyError):
        gold_score("hello", "broken_leg", world)


def test_each_conditions_answer_gets_nothing_for_another_condition(world):
    for c in world["conditions"]:
        for lang in ("en", "zh"):
            sentences = [c[f"name_{lang}"] + ".", c[f"advice_{lang}"], c[f"doctor_{lang}"]]
            answer = (" " if lang == "en" else "").join(sentences)
            assert gold_score(answer, c["id"], world)["total"] == 1.0, answer
            for other in world["conditions"]:
                if other["id"] != c["id"]:
                    score = gold_score(answer, other["id"], world)
                    parts = (score["condition"], score["advice"], score["doctor"], score["no_wrong"])
                    assert parts == (0, 0, 0, 0), (answer, other["id"])


def test_rubric_prefers_chosen_over_rejected_on_every_held_out_pair(world):
    for rec in read_jsonl("rm_test.jsonl"):
        chosen = gold_score(rec["chosen"], rec["condition"], world, rec["lang"])["total"]
        rejected = gold_score(rec["rejected"], rec["condition"], world, rec["lang"])["total"]
        assert chosen == 1.0 and chosen > rejected, rec


def test_rubric_given_the_language_gives_nothing_for_an_answer_in_the_other_one(world):
    english = ("This sounds like a common cold. Rest and drink plenty of fluids. "
               "See a doctor if it lasts more than ten days.")
    assert gold_score(english, "common_cold", world)["total"] == 1.0  # no language given: either counts
    assert gold_score(english, "common_cold", world, "en")["total"] == 1.0
    assert gold_score(english, "common_cold", world, "zh") == {
        "condition": 0, "advice": 0, "doctor": 0, "no_wrong": 1, "no_repeat": 1, "total": 0.4}
    chinese = "听起来像是普通感冒。多休息，多喝水。如果症状超过十天，请就医。"
    assert gold_score(chinese, "common_cold", world, "zh")["total"] == 1.0
    assert gold_score(chinese, "common_cold", world, "en")["total"] == 0.4
    assert gold_score("可能是普通感冒，也可能是 flu。", "common_cold", world, "zh")["no_wrong"] == 0  # any language


def test_test_references_score_one(world):
    for rec in read_jsonl("test.jsonl"):
        assert gold_score(rec["reference"], rec["condition"], world)["total"] == 1.0
