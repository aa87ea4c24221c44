"""make real (nanorlhf.real) and the pairs a model makes itself (nanorlhf.pairs): the format judge by hand, pairs
that prefer a right answer over a wrong one, the tables and the bar from hand-made results, docs/real.md's blocks,
and (slow) every stage wired end to end on the tiny model, one iteration each, then reused."""

import argparse
import json
import os
import re
import shutil
import sys

import pytest
from conftest import ROOT

from nanorlhf import pairs, real
from nanorlhf.args import parse_range
from nanorlhf.errors import UserError
from nanorlhf.rewards import accuracy, readable

PAGE = os.path.join(ROOT, "docs", "real.md")
TRAIN = os.path.join(ROOT, "data", "real", "arith_train.jsonl")
TEST = os.path.join(ROOT, "data", "real", "arith_test.jsonl")
BLOCKS = ["run", "results", "kinds", "pairs", "examples", "times"]


@pytest.mark.parametrize("response, expected", [
    ("23 + 45 = 68", 1.0), ("The answer is 68.", 1.0), ("69", 1.0), ("<think>68 or 69</think><answer>68</answer>", 1.0),
    ("34 or 35", 0.0), ("I do not know.", 0.0), ("", 0.0), ("23 + 45", 0.0),  # only the question's numbers: 23 or 45
])
def test_readable_is_one_number_committed_to_right_or_wrong(response, expected):
    assert readable("What is 23 + 45?", response, answer="68") == expected
    assert accuracy("What is 23 + 45?", response, answer="68") <= expected  # right implies readable


def judged(answers):
    """[(response, ended, score)] per question -> pairs.make_pairs's answers and scores."""
    flat = [a for question in answers for a in question]
    return [{"prompt": f"q{q}", "response": r, "ended": e} for q, question in enumerate(answers)
            for r, e, _ in question], [s for _, _, s in flat]


def make(answers, eval_questions=0, limit=1, allow_unended=False, seed=0):
    questions = [(f"data:{q + 1}", {"question": f"q{q}", "answer": "1"}) for q in range(len(answers))]
    args = argparse.Namespace(seed=seed, eval_questions=eval_questions, threshold=1.0, pairs_per_question=limit,
                              allow_unended=allow_unended)
    return pairs.make_pairs(questions, *judged(answers), len(answers[0]), args)


def test_a_pair_is_a_right_ended_answer_over_a_wrong_one_and_a_cut_answer_is_wrong():
    train, evals, sft, samples, stats = make([
        [("1", True, 1.0), ("2", True, 0.0), ("1 and on", False, 1.0)],  # right, wrong, right but cut: wrong
        [("1", True, 1.0), ("1.0", True, 1.0), ("one", True, 1.0)],  # all right: no pair, an SFT answer
        [("7", True, 0.0), ("8", False, 0.0), ("9", True, 0.0)],  # all wrong: nothing
    ])
    assert train == [{"prompt": "q0", "chosen": "1", "rejected": train[0]["rejected"]}]
    assert train[0]["rejected"] in ("2", "1 and on") and evals == []
    assert [m["messages"][0]["content"] for m in sft] == ["q0", "q1"]
    assert sft[0]["messages"][1] == {"role": "assistant", "content": "1"}
    assert [s["right"] for s in samples] == [True, False, False, True, True, True, False, False, False]
    assert (stats["questions_with_a_pair"], stats["all_right"], stats["all_wrong"], stats["right"]) == (1, 1, 1, 4 / 9)
    assert make([[("1 and on", False, 1.0), ("2", True, 0.0)]], allow_unended=True)[0][0]["chosen"] == "1 and on"


def test_pairs_use_no_text_twice_stop_at_the_limit_and_the_held_out_questions_go_to_eval():
    answers = [[("1", True, 1.0), ("1", True, 1.0), ("a", True, 1.0), ("2", True, 0.0), ("3", True, 0.0)]] * 3
    train, evals, sft, _, stats = make(answers, eval_questions=1, limit=3)
    assert len(train) == 4 and len(evals) == 2  # 2 distinct right texts: 2 pairs per question
    for pair in train + evals:
        assert pair["chosen"] in ("1", "a") and pair["rejected"] in ("2", "3")
    assert len({p["chosen"] for p in train[:2]}) == 2 and len({p["rejected"] for p in train[:2]}) == 2
    assert [p["prompt"] for p in evals] == ["q2", "q2"] and len(sft) == 2  # no SFT answer from a held-out question
    assert (stats["train_questions_with_a_pair"], stats["eval_questions_with_a_pair"]) == (2, 1)
    assert make(answers, limit=1, seed=3)[0] == make(answers, limit=1, seed=3)[0]  # deterministic given the seed


def test_the_pairs_step_on_the_tiny_model_writes_the_same_files_given_the_seed(tiny_model_dir, tmp_path, launcher):
    """A judge the tiny model can satisfy (an answer of an odd number of characters), answers cut at 6 tokens."""
    (tmp_path / "judge.py").write_text("def odd(prompt, response, **fields):\n    return len(response) % 2\n")
    outputs = []
    for run in ("a", "b"):
        code, stderr = launcher.run("-m nanorlhf.pairs", "--model", tiny_model_dir, "--data", TRAIN, "--output_dir",
                                    tmp_path / run, "--reward_fn", f"{tmp_path}/judge.py:odd", "--questions", "6",
                                    "--eval_questions", "2", "--samples", "4", "--max_new_tokens", "6",
                                    "--allow_unended", "--seed", "3", "--dtype", "fp32")
        assert code == 0, stderr[-3000:]
        outputs.append({name: (tmp_path / run / name).read_text() for name in os.listdir(tmp_path / run)})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == ["eval.jsonl", "samples.jsonl", "sft.jsonl", "stats.json", "train.jsonl"]
    samples = [json.loads(line) for line in outputs[0]["samples.jsonl"].splitlines()]
    assert len(samples) == 24 and all(s["right"] == (len(s["response"]) % 2 == 1) for s in samples)
    for pair in map(json.loads, outputs[0]["train.jsonl"].splitlines()):
        assert len(pair["chosen"]) % 2 == 1 and len(pair["rejected"]) % 2 == 0
    stats = json.loads(outputs[0]["stats.json"])
    assert stats["questions"] == 6 and stats["questions_with_a_pair"] >= 1


def row(accuracy, readable, ended=1.0, kl=0.0, length=20.0):
    return {"accuracy": accuracy, "readable": readable, "arithmetic": accuracy / readable, "ended": ended,
            "response_length": length, "kl_to_start": kl}


def seed_result(seed, ppo, grpo, ended=1.0, sft=None):
    return {"seed": seed, "models": {"start": row(0.2, 0.5), "ppo": {**row(ppo, 0.8, ended), "train_s": 100.0},
                                     "grpo": {**row(grpo, 0.9), "train_s": 60.0},
                                     **({"sft": {**row(sft, 1.0), "train_s": 300.0}} if sft else {})},
            "stage_s": {"pairs": 30.0, "ppo": 100.0, "grpo": 60.0}, "rm_eval_accuracy": 0.75,
            "pairs": {"questions": 256, "samples_per_question": 4, "right": 0.1, "ended": 0.8,
                      "questions_with_a_pair": 90, "all_right": 1, "all_wrong": 165, "train_pairs": 120,
                      "eval_pairs": 12, "eval_questions": 32}}


def test_the_table_is_the_seed_mean_and_range_and_arithmetic_is_right_among_readable():
    table = real.results_table([seed_result(1, 0.4, 0.3), seed_result(2, 0.2, 0.5)], ["start", "ppo", "grpo"])
    assert "| start | - (the starting model) | 0.200 | 0.500 | 0.400 | 1.000 | 20.0 | 0.000 | – |" in table
    assert "| ppo | " in table and "| 0.300 (0.200 – 0.400) | 0.800 | 0.375 (0.250 – 0.500) |" in table
    assert table.splitlines()[3].endswith("| 100 |")  # ppo's train s
    assert "| grpo | GRPO on the program's reward (accuracy) |" in table
    block = real.pairs_block([seed_result(1, 0.4, 0.3)])
    assert "90 (all right: 1, all wrong: 165)" in block and "held-out pairs: 0.750" in block
    times = real.times_block([seed_result(1, 0.4, 0.3)])
    assert "| pairs | 30 |" in times and "| **one seed, all stages** | 190 |" in times


def test_accuracy_by_phrasing_and_level_is_each_models_seed_mean(tmp_path):
    questions = [("a", 1), ("a", 2), ("b", 1), ("b", 1)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": "1", "phrasing": p,
                                                             "level": lv}) + "\n"
                                                 for i, (p, lv) in enumerate(questions)))
    right = {1: {"start": [0, 0, 1, 0], "grpo": [1, 0, 1, 1]}, 2: {"start": [0, 0, 1, 0], "grpo": [0, 0, 1, 0]}}
    for seed, models in right.items():
        (tmp_path / f"seed-{seed}" / "eval").mkdir(parents=True)
        (tmp_path / f"seed-{seed}" / "eval" / "predictions.jsonl").write_text("".join(
            json.dumps({"model": m, "accuracy": float(r)}) + "\n" for m, rs in models.items() for r in rs))
    args = argparse.Namespace(eval_data=str(tmp_path / "test.jsonl"), output_dir=str(tmp_path))
    lines = real.kinds_block(args, [{"seed": 1}, {"seed": 2}], ["start", "grpo"]).splitlines()
    assert lines[0] == "| model | phrasing a (2) | phrasing b (2) |"
    assert lines[2:4] == ["| start | 0.000 | 0.500 |", "| grpo | 0.250 (0.000 – 0.500) | 0.750 (0.500 – 1.000) |"]
    assert lines[5:] == ["| model | level 1 (3) | level 2 (1) |", "|---|---|---|", "| start | 0.333 | 0.000 |",
                         "| grpo | 0.667 (0.333 – 1.000) | 0.000 |"]
    (tmp_path / "test.jsonl").write_text((json.dumps({"question": "q", "answer": "1"}) + "\n") * 4)  # no such fields
    assert real.kinds_block(args, [{"seed": 1}], ["start", "grpo"]) == ""


def test_the_bar_is_ten_points_over_the_start_on_every_seed_with_95_percent_ended():
    results = [seed_result(s, 0.31 + s / 100, 0.25) for s in (1, 2, 3)]
    lines = real.verdicts(results, ["start", "ppo", "grpo"]).splitlines()
    assert lines[0].startswith("- ppo: accuracy +0.130 ") and "(per seed: +0.120, +0.130, +0.140)" in lines[0]
    assert lines[0].endswith("is met.") and lines[1].endswith("is not met.")
    assert real.verdicts([seed_result(1, 0.5, 0.5, ended=0.9)], ["start", "ppo"]).endswith(
        "is not met (one seed: no spread measured).")
    # after an SFT stage, also what RL added over the SFT model: ppo 0.32, 0.33, 0.34 over sft 0.3, 0.35, 0.3
    results = [seed_result(s, 0.31 + s / 100, 0.25, sft=v) for s, v in ((1, 0.3), (2, 0.35), (3, 0.3))]
    line = real.verdicts(results, ["start", "sft", "ppo"])
    assert "is met; over the SFT model it started from: +0.013 (per seed: +0.020, -0.020, +0.040)" in line
    assert "| sft | SFT on worked answers (--sft_data) | 0.317 (0.300 – 0.350) |" in real.results_table(
        results, ["start", "sft", "ppo"])


def test_the_page_has_a_placeholder_block_for_each_measurement_and_commands_that_parse():
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    for name in BLOCKS:
        block = re.search(rf"<!-- measured:{name} -->\n(.*?)\n<!-- /measured:{name} -->", text, flags=re.S)
        assert block, name
    commands = re.findall(r"python -m nanorlhf\.real([^\n`]*)", text)
    assert commands
    for command in commands:
        real.build_parser().parse_args(command.split())
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    assert re.search(r"^real: ", makefile, flags=re.M) and "-m nanorlhf.real" in makefile


def test_every_numeric_flag_declares_its_range():
    for parser in (real.build_parser(), pairs.build_parser()):
        for action in parser._actions:
            if action.type in (int, float):
                assert action.range is not None, action.option_strings
                parse_range(action.range)


def test_bad_methods_and_sizes_are_one_line(tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--data", TRAIN, "--eval_data", TEST, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="--methods: unknown"):
        real.main([*base, "--methods", "ppo,rlhf"])
    with pytest.raises(UserError, match="--eval_questions 8 leaves none"):
        real.main([*base, "--questions", "8", "--eval_questions", "8"])
    assert not os.path.exists(tmp_path / "out")


def test_a_stage_is_reused_only_with_the_same_command_and_after_what_it_reads_from(tmp_path, capsys):
    def make_dir(folder, text):  # a stage: a command that writes its output folder
        return [sys.executable, "-c", f"import os; os.makedirs({str(folder)!r}); open({str(folder / 'x')!r}, 'w')"
                f".write({text!r})"]

    a, b = tmp_path / "a", tmp_path / "b"
    for _ in range(2):
        stages = real.Stages(str(tmp_path))
        stages.run("a", make_dir(a, "1"), str(a))
        stages.run("b", make_dir(b, "1"), str(b), after=["a"])
    assert capsys.readouterr().err.count(": reused (") == 2
    stages = real.Stages(str(tmp_path))
    stages.run("a", make_dir(a, "2"), str(a))  # another command: runs again
    assert (a / "x").read_text() == "2"
    stages = real.Stages(str(tmp_path))  # as if stopped here: b's command is the same, but a ran after it
    stages.run("b", make_dir(b, "1"), str(b), after=["a"])
    assert " b: reused (" not in capsys.readouterr().err
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"a", "b"}


def planned(tmp_path, monkeypatch, *flags):
    """The commands run_seed would run, in order (name: argv), none of them run."""
    commands = {}

    class Planned(Exception):
        pass

    def record(self, name, argv, output, after=()):
        commands[name] = argv
        if name == "eval":
            raise Planned

    monkeypatch.setattr(real.Stages, "run", record)
    args = real.build_parser().parse_args(["--model", "M", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(Planned):
        real.run_seed(args, 1, ["ppo", "grpo", "dpo"])
    return commands


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_every_method_starts_from_the_sft_model_and_without_sft_data_from_the_starting_model(tmp_path,
                                                                                                monkeypatch):
    sft = str(tmp_path / "seed-1" / "sft")
    commands = planned(tmp_path, monkeypatch)
    assert list(commands)[:3] == ["sft", "merge sft", "pairs"]
    assert flag(commands["sft"], "--model") == "M" and flag(commands["sft"], "--data") == "data/real/arith_sft.jsonl"
    assert flag(commands["merge sft"], "--base") == "M" and flag(commands["merge sft"], "--output_dir") == sft
    for stage, name in (("pairs", "--model"), ("rm", "--model"), ("ppo", "--sft"), ("grpo", "--sft"),
                        ("dpo", "--model"), ("merge ppo", "--base"), ("merge grpo", "--base"), ("merge dpo", "--base")):
        assert flag(commands[stage], name) == sft, stage
    assert f"sft={sft}" in commands["eval"] and "start=M" in commands["eval"]
    assert real.models(real.build_parser().parse_args([]), ["ppo"]) == ["start", "sft", "ppo"]

    commands = planned(tmp_path, monkeypatch, "--sft_data", "")
    assert "sft" not in commands and "merge sft" not in commands
    for stage, name in (("pairs", "--model"), ("rm", "--model"), ("ppo", "--sft"), ("grpo", "--sft"),
                        ("dpo", "--model"), ("merge ppo", "--base")):
        assert flag(commands[stage], name) == "M", stage
    assert not any(a.startswith("sft=") for a in commands["eval"])


TINY = ["--questions", "8", "--eval_questions", "2", "--samples", "4", "--response_length", "6", "--iterations", "1",
        "--batch_size", "8", "--grpo_batch_size", "8", "--group", "4", "--eval_max_new_tokens", "6", "--dtype", "fp32",
        "--pairs_args=--allow_unended", "--rm_args", "--max_steps 1", "--dpo_args", "--max_steps 1",
        "--sft_args", "--max_steps 1"]


@pytest.mark.slow
def test_every_stage_on_the_tiny_model_leaves_merged_models_a_table_and_the_page_then_is_reused(
        tiny_model_dir, tmp_path, monkeypatch, capsys, forked_stages):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "judge.py").write_text("def odd(prompt, response, **fields):\n    return len(response) % 2\n")
    with open(TEST, encoding="utf-8") as f:
        (tmp_path / "test.jsonl").write_text("".join(f.readlines()[:4]))
    page = tmp_path / "real.md"
    shutil.copyfile(PAGE, page)
    argv = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "real"), "--data", TRAIN,
            "--eval_data", str(tmp_path / "test.jsonl"), "--reward_fn", f"{tmp_path}/judge.py:odd",
            "--methods", "ppo", "--page", str(page), *TINY]  # grpo's and dpo's commands: the planned-commands test
    real.main(argv)
    seed_dir = tmp_path / "real" / "seed-1"
    for method in ("sft", "ppo"):  # merged: a plain model dir, no adapter
        assert (seed_dir / method / "config.json").is_file()
        assert not (seed_dir / method / "adapter_config.json").exists()
    assert (seed_dir / "rm" / "adapter_config.json").is_file()
    with open(seed_dir / "eval" / "results.json", encoding="utf-8") as f:
        assert [r["model"] for r in json.load(f)] == ["start", "sft", "ppo"]
    result = json.loads((seed_dir / "result.json").read_text())
    assert set(result["stage_s"]) == {"sft", "pairs", "rm", "ppo", "eval", "merge sft", "merge ppo"}
    assert 0 <= result["rm_eval_accuracy"] <= 1 and result["models"]["start"]["kl_to_start"] == 0
    first = (tmp_path / "real" / "results.md").read_text()
    assert "| ppo | PPO on the reward model (LoRA RM on its own answers' pairs) |" in first and "## examples" in first
    assert "over the SFT model it started from" in first
    text = page.read_text()
    assert "not measured yet" not in text and "Measured by `python -m nanorlhf.real" in text
    assert "| sft | SFT on worked answers (--sft_data) |" in text

    capsys.readouterr()
    real.main(argv)  # again: every stage reused, the same table
    assert ": reused (" in capsys.readouterr().err
    assert (tmp_path / "real" / "results.md").read_text() == first
    assert json.loads((seed_dir / "result.json").read_text())["stage_s"] == result["stage_s"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
