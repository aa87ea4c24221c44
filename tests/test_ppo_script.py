"""train_ppo.py end to end on the tiny model, and the memory plan's shared weights."""

import json
import os
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import DEMO, run_script
from nanorlhf.lora import disable_adapters
from nanorlhf.ppo_setup import build_models
from nanorlhf.rollout import generate, logprobs_of, response_mask, reward_scores

TRL_NAMES = ["objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
             "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"]
SMALL = ["--batch_size", 4, "--response_length", 8, "--ppo_epochs", 2, "--num_mini_batches", 2, "--logging_steps", 1]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_ppo_run_logs_trl_metrics_and_starts_on_policy(tiny_model_dir, rm_dir, tmp_path):
    out = tmp_path / "ppo"
    run_script("train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data", f"{DEMO}/ppo.jsonl",
               "--output_dir", out, "--num_updates", 2, *SMALL)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in TRL_NAMES + ["val/explained_variance", "val/response_length", "val/eos_fraction"]:
        assert name in rows[0]
    # before any update the training forward reproduces the rollout's log-probs exactly enough
    assert rows[0]["val/first_approxkl"] < 1e-6
    assert rows[0]["val/first_clipfrac"] == 0.0
    assert abs(rows[0]["objective/kl"]) < 1e-3  # the policy starts as the reference
    # outputs: a PEFT adapter on --sft plus the critic; merge_lora turns the policy into a model
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
    assert (out / "critic" / "value_head.safetensors").exists()
    run_script("merge_lora.py", "--base", tiny_model_dir, "--adapter", out, "--output_dir", tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.slow
def test_critic_free_estimator_builds_no_critic(tiny_model_dir, rm_dir, tmp_path):
    out = tmp_path / "grpo"
    run_script("train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data", f"{DEMO}/ppo.jsonl",
               "--output_dir", out, "--num_updates", 1, "--advantage_estimator", "grpo",
               "--num_samples_per_prompt", 2, "--no-whiten_advantages", *SMALL)
    assert not (out / "critic").exists()
    assert read_metrics(out)[0]["loss/value_avg"] == 0.0


def ppo_args(sft, rm, **overrides):
    args = dict(sft=sft, rm=rm, finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                lora_target="all", trust_remote_code=False, critic_init="rm", gradient_checkpointing=False)
    return types.SimpleNamespace(**{**args, **overrides})


def randomize_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_reference_is_the_sft_model_with_adapters_off(tiny_model_dir, rm_dir):
    torch.manual_seed(0)
    m = build_models(ppo_args(tiny_model_dir, rm_dir), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    randomize_lora(m.policy)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("The common cold", "偏头痛会")]
    query, query_mask, response, _ = generate(m.policy, prompts, 8, [tok.eos_token_id], tok.pad_token_id)
    mask = response_mask(response, [tok.eos_token_id], tok.pad_token_id)
    sft = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = logprobs_of(sft, query, response, mask, query_mask)
        with disable_adapters(m.policy):
            ref = logprobs_of(m.policy, query, response, mask, query_mask)
        policy = logprobs_of(m.policy, query, response, mask, query_mask)
    assert torch.equal(torch.where(mask > 0, ref, 0.0), torch.where(mask > 0, expected, 0.0))
    assert (policy - expected).abs().max() > 1e-3  # the adapters do change the policy


def test_reward_is_the_rm_with_the_critic_adapters_off(tiny_model_dir, rm_dir):
    torch.manual_seed(0)
    m = build_models(ppo_args(tiny_model_dir, rm_dir), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert m.reward_model is m.critic  # one base model for both
    randomize_lora(m.critic)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    query = torch.tensor([[tok.pad_token_id, 5, 6], [7, 8, 9]])
    query_mask = (query != tok.pad_token_id).long()
    response = torch.tensor([[10, tok.eos_token_id, tok.pad_token_id], [11, 12, 13]])
    mask = response_mask(response, [tok.eos_token_id], tok.pad_token_id)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        with disable_adapters(m.reward_model):
            ours = reward_scores(m.reward_model, query, response, mask, query_mask)
        # transformers' own classifier on the same real tokens, one sequence at a time
        for i in range(2):
            ids = torch.cat([query[i][query_mask[i] > 0], response[i][mask[i] > 0]])[None]
            assert abs(rm(input_ids=ids).logits[0, 0].item() - ours[i].item()) < 1e-4
        with_adapters = reward_scores(m.reward_model, query, response, mask, query_mask)
    assert (with_adapters - ours).abs().max() > 1e-3


def test_value_head_starts_as_the_reward_head(tiny_model_dir, rm_dir):
    m = build_models(ppo_args(tiny_model_dir, rm_dir), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert torch.equal(m.v_head.weight, m.critic.score.weight)
    assert m.v_head.weight.data_ptr() != m.critic.score.weight.data_ptr()  # a copy, trained on its own
    trainable = {n for n, p in m.critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
