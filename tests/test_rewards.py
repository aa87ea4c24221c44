"""Rewards a program computes (nanorlhf.rewards): the built-in functions by hand, loading a user's
function, and the one line a bad function gets."""

import pytest

from nanorlhf.errors import UserError
from nanorlhf.rewards import accuracy, compute_rewards, format, gold, length, load_reward_fns, normalize


def test_normalize_by_hand():
    assert normalize("  The Common-Cold!  ") == "the common cold"
    assert normalize("ＡＢＣ，偏头痛。") == "abc 偏头痛"  # full-width letters and Chinese punctuation


def test_accuracy_by_hand():
    assert accuracy("q", "This sounds like the common cold.", answer="Common cold") == 1.0
    assert accuracy("q", "This sounds like the flu.", answer="common cold") == 0.0
    assert accuracy("q", "听起来像是偏头痛。", answer="偏头痛") == 1.0
    # with <answer> tags only the answer counts, not the reasoning before it
    assert accuracy("q", "<think>not the common cold</think><answer>flu</answer>", answer="common cold") == 0.0
    assert accuracy("q", "<think>hmm</think><answer> Flu </answer>", answer="flu") == 1.0
    assert accuracy("q", "", answer="flu") == 0.0  # an empty response
    with pytest.raises(ValueError, match="needs an 'answer' field"):
        accuracy("q", "flu")


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

