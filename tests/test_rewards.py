"""Rewards a program computes (nanorlhf.rewards): the built-in functions by hand, loading a user's
function, and the one line a bad function gets."""

import pytest

from nanorlhf.errors import UserError
from decimal import Decimal

from nanorlhf.rewards import (accuracy, compute_rewards, format, gold, length, load_reward_fns, normalize, numbers,
                              parse_number_answer)


def test_normalize_by_hand():
    assert normalize("  The Common-Cold!  ") == "the common cold"
    assert normalize("ＡＢＣ，偏头痛。") == "abc 偏头痛"  # full-width letters and Chinese punctuation


def test_accuracy_of_a_text_answer_by_hand():
    assert accuracy("q", "This sounds like the common cold.", answer="Common cold") == 1.0
    assert accuracy("q", "This sounds like the flu.", answer="common cold") == 0.0
    assert accuracy("q", "听起来像是偏头痛。", answer="偏头痛") == 1.0
    # whole words: the reference is not found inside another word
    assert accuracy("q", "It is influenza.", answer="flu") == 0.0
    assert accuracy("q", "It is the flu.", answer="flu") == 1.0
    # with <answer> tags only the answer counts, not the reasoning before it
    assert accuracy("q", "<think>not the common cold</think><answer>flu</answer>", answer="common cold") == 0.0
    assert accuracy("q", "<think>hmm</think><answer> Flu </answer>", answer="flu") == 1.0
    assert accuracy("q", "", answer="flu") == 0.0  # an empty response
    with pytest.raises(ValueError, match="needs an 'answer' field"):
        accuracy("q", "flu")


def test_numbers_are_whole_numbers_as_written():
    assert numbers("1 2 3 ... 100") == [1, 2, 3, 100]
    assert numbers("1,068 and 68.0 and 68.") == [1068, Decimal("68.0"), 68]
    assert numbers("-68, 45-23, (4)-1, x = −3") == [-68, 45, 23, 4, 1, -3]  # a minus after a digit subtracts
    assert numbers("答案是６８。") == [68]  # full-width digits
    assert numbers("no numbers here") == []


@pytest.mark.parametrize("response, prompt, expected", [
    ("68", None, 68),
    ("23 + 45 = 68.", None, 68),  # what follows the last "="
    ("23 + 45 = 68. So he has 68 apples.", None, 68),  # one distinct number, said twice
    ("The sum of 23 and 45 is 68", "What is 23 + 45?", 68),  # the prompt's numbers restated
    ("The sum of 23 and 45 is 68", None, None),  # ... without the prompt: three candidates
    ("34 or 35", None, None),  # a hedge commits to nothing
    ("23 + 45 = 68 or 69", None, None),
    ("1 2 3 ... 100", None, None),
    ("I don't know", None, None),
    ("What is 23 + 45?", "What is 23 + 45?", None),  # only the prompt's numbers, two of them
    ("45", "What is 90 - 45?", 45),  # the answer is also in the prompt: nothing else is left
    ("6 or 7", "What is 13 - 7?", 6),  # the prompt's 7 is the question restated, not a second guess
])
def test_parse_number_answer_by_hand(response, prompt, expected):
    assert parse_number_answer(response, prompt) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("134", "34", 0.0),  # not a substring: 134 is another number
    ("1 2 3 ... 100", "34", 0.0),  # listing numbers earns nothing
    ("34 or 35", "34", 0.0),  # nor does hedging, whichever is right
    ("34 or 35", "35", 0.0),
    ("23 + 45 = 68.", "68", 1.0),
    ("68", "68", 1.0),
    ("The answer is 68.", "68", 1.0),
    ("68.0", "68", 1.0),  # compared as numbers
    ("1,068", "68", 0.0),
    ("1,068", "1068", 1.0),
    ("-68", "68", 0.0),
    ("87 - 29 = 58", "58", 1.0),
    ("x = -3", "-3", 1.0),
    ("答案是68。", "68", 1.0),
    ("答案是６８。", "６８", 1.0),  # full-width in the response and in the reference
    ("<think>23 + 45 is 68 or 69</think><answer>68</answer>", "68", 1.0),  # only the tagged answer counts
    ("<think>23 + 45 = 68</think><answer>69</answer>", "68", 0.0),
])
def test_accuracy_of_a_numeric_answer_by_hand(response, answer, expected):
    assert accuracy("What is 23 + 45?", response, answer=answer) == expected


def test_accuracy_of_a_numeric_answer_ignores_the_restated_question():
    prompt = "Tom has 23 apples and buys 45 more. How many apples does he have now?"
    assert accuracy(prompt, "Tom has 23 + 45 = 68 apples.", answer="68") == 1.0
    assert accuracy(prompt, "He had 23, bought 45, so he has 68 now.", answer="68") == 1.0
    assert accuracy(prompt, "He had 23, bought 45, so 68 or 70.", answer="68") == 0.0


def test_format_by_hand():
    assert format("q", "<think>a cold, most likely</think>\n<answer>common cold</answer>") == 1.0
    assert format("q", "<answer>common cold</answer>") == 0.0  # no reasoning
    assert format("q", "<think>x</think><answer>y</answer> and more") == 0.0  # text after the answer
    assert format("q", "Diagnosis: flu", pattern=r"Diagnosis: \w+$") == 1.0


def test_length_by_hand():
    assert length("q", "x" * 10, low=20, high=100) == 0.5
    assert length("q", "", low=20, high=100) == 0.0
    assert length("q", "x" * 20, low=20, high=100) == length("q", "x" * 100, low=20, high=100) == 1.0
    assert length("q", "x" * 150, low=20, high=100) == 0.5
    assert length("q", "x" * 250, low=20, high=100) == 0.0


def test_gold_is_the_rubric_total():
    answer = ("This sounds like a common cold. Rest and drink plenty of fluids. "
              "See a doctor if it lasts more than ten days.")
    assert gold("q", answer, condition="common_cold", lang="en") == 1.0
    # no condition, advice or doctor, and a wrong condition named: only no_repeat holds, 1 of 5
    assert gold("q", "It is a migraine.", condition="common_cold", lang="en") == 0.2
    with pytest.raises(ValueError, match="needs a 'condition' field"):
        gold("q", answer)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_users_file_and_a_module_function_load_and_sum(tmp_path):
    user = write(tmp_path / "my_rewards.py",
                 "def brevity(prompt, response, **fields):\n    return -len(response) / 10\n")
    fns = load_reward_fns(f"{user}:brevity, nanorlhf.rewards:accuracy")
    assert [spec for spec, _, _ in fns] == [f"{user}:brevity", "nanorlhf.rewards:accuracy"]
    records = [{"prompt": "p", "answer": "flu"}, {"prompt": "p", "answer": "cold"}]
    totals = compute_rewards(fns, ["p", "p"], ["flu", "a cold"], records, ["a.jsonl:1", "a.jsonl:2"])
    assert totals == pytest.approx([-0.3 + 1.0, -0.6 + 1.0])


def test_a_batched_function_gets_lists_and_kwargs(tmp_path):
    user = write(tmp_path / "batched.py",
                 "def score(prompts, responses, answer, bonus=0.0, **fields):\n"
                 "    return [float(r == a) + bonus for r, a in zip(responses, answer)]\n")
    fns = load_reward_fns(f"{user}:score", '{"bonus": 0.5}')
    totals = compute_rewards(fns, ["p", "q"], ["x", "y"], [{"answer": "x"}, {"answer": "z"}], ["f:1", "f:2"])
    assert totals == [1.5, 0.5]


@pytest.mark.parametrize("spec, error", [
    ("missing.py:f", "--reward_fn missing.py:f: no such file missing.py"),
    ("{dir}/ok.py:nope", "--reward_fn {dir}/ok.py:nope: {dir}/ok.py has no function 'nope'"),
    ("{dir}/broken.py:f", "--reward_fn {dir}/broken.py:f: {dir}/broken.py failed to import: NameError:"),
    ("no_such_module_xyz:f", "--reward_fn no_such_module_xyz:f: cannot import no_such_module_xyz:"),
    ("accuracy", "--reward_fn 'accuracy': expected FILE.py:NAME or package.module:NAME"),
])
def test_a_reward_function_that_cannot_be_loaded_is_one_line(tmp_path, spec, error):
    write(tmp_path / "ok.py", "def f(prompt, response, **fields):\n    return 1.0\n")
    write(tmp_path / "broken.py", "undefined_name\n")
    with pytest.raises(UserError) as e:
        load_reward_fns(spec.format(dir=tmp_path))
    assert str(e.value).startswith(error.format(dir=tmp_path))


@pytest.mark.parametrize("body, error", [
    ("return 'good'", "b.jsonl:2: --reward_fn {spec} returned 'good', not a finite number"),
    ("return float('nan')", "b.jsonl:2: --reward_fn {spec} returned nan, not a finite number"),
    ("return None", "b.jsonl:2: --reward_fn {spec} returned None, not a finite number"),
    ("raise KeyError('answer')", "b.jsonl:2: --reward_fn {spec} raised KeyError: 'answer'"),
])
def test_a_reward_function_that_fails_names_the_record(tmp_path, body, error):
    path = write(tmp_path / "bad.py", f"def f(prompt, response, **fields):\n    if response == 'y':\n        {body}\n"
                                      "    return 1.0\n")
    spec = f"{path}:f"
    with pytest.raises(UserError) as e:
        compute_rewards(load_reward_fns(spec), ["p", "q"], ["x", "y"], [{}, {}], ["b.jsonl:1", "b.jsonl:2"])
    assert str(e.value) == error.format(spec=spec)

