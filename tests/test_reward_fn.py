"""train_ppo.py with rewards a program computes (--reward_fn), and with a reward model that has a
tokenizer of its own (--rm_tokenizer_mismatch retokenize)."""

import json
import os

import pytest
import torch
from conftest import DEMO, other_tokenizer_model, read_metrics
from transformers import AutoModelForSequenceClassification

from nanorlhf.data import encode_answer
from nanorlhf.forward import reward_scores_of_texts
from nanorlhf.loading import load_tokenizer
from nanorlhf.template import end_of_turn

# The share of a response's characters that are Chinese: the tiny model's vocabulary is half Chinese, so
# it samples some in every answer, and more of them is a reward it can learn in a few iterations.
CHINESE = '''import re


def chinese(prompt, response, **fields):
    return len(re.findall(r"[\\u4e00-\\u9fff]", response)) / max(1, len(response))
'''


def english_prompts(folder, n=14):
    """The first n English prompts of the demo's ppo.jsonl (their answers start with little Chinese)."""
    with open(os.path.join(DEMO, "ppo.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if '"lang": "en"' in line][:n]
    (folder / "prompts.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder / "prompts.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_a_fake_reward_is_learned_by_grpo_and_by_ppo(estimator, launcher, tiny_model_dir, tmp_path):
    (tmp_path / "fake.py").write_text(CHINESE, encoding="utf-8")
    out = tmp_path / estimator
    samples = ["--num_samples_per_prompt", 4] if estimator == "grpo" else []
    # full fine-tuning: on a model this small, LoRA moves the token distribution too slowly for a test
    fake = f"{tmp_path / 'fake.py'}:chinese"
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--reward_fn", fake,
                                "--data", english_prompts(tmp_path), "--output_dir", out, "--advantage_estimator",
                                estimator, *samples, "--batch_size", 16, "--response_length", 8, "--num_updates", 10,
                                "--finetuning_type", "full", "--learning_rate", 1e-2, "--kl_coef", 0,
                                "--temperature", 1.0, "--missing_eos_penalty", 0, "--logging_steps", 1, "--seed", 0)
    assert code == 0 and "no reward model" in stderr, stderr
    curve = [row["objective/fn_scores"] for row in read_metrics(out)]
    assert len(curve) == 10 and "objective/rm_scores" not in read_metrics(out)[0]
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.3, curve  # measured (first 3 -> last 3): grpo 0.30 -> 0.82, gae 0.23 -> 0.95
    assert (out / "critic").exists() == (estimator == "gae")


@pytest.mark.slow
@pytest.mark.parametrize("body, error", [
    ("raise KeyError('answer')", "--reward_fn {spec} raised KeyError: 'answer'"),
    ("return 'high'", "--reward_fn {spec} returned 'high', not a finite number"),
])
def test_a_reward_function_that_fails_stops_the_run_with_one_line(body, error, launcher, tiny_model_dir, tmp_path):
    # fails on the first prompt's responses; every response of the first iteration comes from line 1 or 2
    (tmp_path / "bad.py").write_text(f"def f(prompt, response, **fields):\n    {body}\n", encoding="utf-8")
    spec, data = f"{tmp_path / 'bad.py'}:f", english_prompts(tmp_path, n=2)
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--reward_fn", spec, "--data", data,
                                "--output_dir", tmp_path / "out", "--batch_size", 2, "--response_length", 4,
                                "--num_updates", 1)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith("error: " + str(data) + ":")
    assert stderr.splitlines()[-1].endswith(error.format(spec=spec))
    assert not (tmp_path / "out").exists()  # it stopped before writing anything


def test_a_missing_reward_function_or_reward_is_one_line(launcher, tiny_model_dir, tmp_path):
    result = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--reward_fn", "nanorlhf.rewards:nope",
                          "--data", f"{DEMO}/ppo.jsonl", "--output_dir", tmp_path / "out")
    assert result == (2, "error: --reward_fn nanorlhf.rewards:nope: nanorlhf.rewards has no function 'nope'\n")
    result = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--data", f"{DEMO}/ppo.jsonl",
                          "--output_dir", tmp_path / "out")
    assert result == (2, "error: --rm (a reward model) or --reward_fn (a reward function) is required\n")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_rm(tmp_path_factory):
    """A reward model whose tokenizer is not the tiny policy's (another vocabulary), with a random head."""
    folder = tmp_path_factory.mktemp("other-rm")
    other_tokenizer_model(folder)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(folder)
    return str(folder)


def test_a_reward_model_with_its_own_tokenizer_reads_the_text_as_its_template_renders_it(other_rm):
    tokenizer = load_tokenizer(other_rm)
    rm = AutoModelForSequenceClassification.from_pretrained(other_rm).eval()
    prompts = [[{"role": "user", "content": "I have a runny nose."}],
               [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "我头痛，怕光。"}],
               [{"role": "user", "content": "Hi"}]]
    responses = ["This sounds like a common cold. Rest.", "可能是偏头痛。", ""]  # an empty answer too
    with torch.no_grad():
        ours = reward_scores_of_texts(rm, tokenizer, prompts, responses)
        eot = end_of_turn(tokenizer)[0]
        for i, (messages, response) in enumerate(zip(prompts, responses)):
            ids = encode_answer(tokenizer, messages, response)
            rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                     tokenize=False)
            # the ids are the chat template's text up to the answer's end of turn, in the RM's own tokens
            assert tokenizer.decode(ids) == rendered[:rendered.rindex(eot) + len(eot)]
            alone = rm(input_ids=torch.tensor([ids])).logits[0, 0]  # transformers' classifier, unpadded
            torch.testing.assert_close(ours[i], alone, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_ppo_with_another_tokenizers_reward_model_and_a_reward_function(launcher, tiny_model_dir, other_rm, tmp_path):
    out = tmp_path / "ppo"
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--rm", other_rm, "--rm_tokenizer_mismatch",
                                "retokenize", "--reward_fn", "nanorlhf.rewards:gold", "--rm_weight", 0.5,
                                "--reward_fn_weight", 2, "--data", f"{DEMO}/ppo.jsonl", "--output_dir", out,
                                "--batch_size", 4, "--response_length", 8, "--num_updates", 2,
                                "--missing_eos_penalty", 0, "--logging_steps", 1)
    assert code == 0, stderr
    assert "the reward model apart with its own tokenizer" in stderr
    assert "--rm_tokenizer_mismatch retokenize: the reward model scores each prompt and response as text" in stderr
    for row in read_metrics(out):
        assert row["objective/scores"] == pytest.approx(0.5 * row["objective/rm_scores"]
                                                        + 2 * row["objective/fn_scores"], abs=1e-5)
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
