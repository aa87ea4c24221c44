"""train_ppo.py end to end on the tiny model, and the memory plan's shared weights."""

import json
import math
import os
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import DEMO, read_metrics
from nanorlhf.lora import add_lora, lora_state_dict, merge_lora, save_adapter
from nanorlhf.forward import logprobs_of, reward_scores
from nanorlhf.ppo_models import base_copies, build_models
from nanorlhf.sampling import generate

TRL_NAMES = ["objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
             "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"]
SMALL = ["--batch_size", 4, "--response_length", 8, "--ppo_epochs", 2, "--num_mini_batches", 2, "--logging_steps", 1]


@pytest.mark.slow
def test_ppo_run_logs_trl_metrics_and_starts_on_policy(tiny_model_dir, rm_dir, tmp_path, launcher):
    out = tmp_path / "ppo"
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data",
                                f"{DEMO}/ppo.jsonl", "--output_dir", out, "--num_updates", 2, *SMALL)
    assert code == 0, stderr[-3000:]
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
    code, stderr = launcher.run("merge_lora.py", "--base", tiny_model_dir, "--adapter", out, "--output_dir",
                                tmp_path / "merged")
    assert code == 0, stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.slow
def test_a_bf16_base_on_cpu_runs_ppo_with_sane_statistics(tiny_model_dir, rm_dir, tmp_path, launcher):
    out = tmp_path / "bf16"
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data",
                                f"{DEMO}/ppo.jsonl", "--output_dir", out, "--num_updates", 2, "--dtype", "bf16", *SMALL)
    assert code == 0 and "torch.bfloat16 frozen weights" in stderr, stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    # the rollout (KV cache, one token at a time) and the training forward (the whole sequence) round
    # differently in bf16, so the first ratio is not exactly 1; but the log-probs agree to a few 1e-3
    assert rows[0]["val/first_approxkl"] < 1e-3 and rows[0]["val/first_clipfrac"] < 0.01
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.float32}  # adapters trained and saved in fp32


@pytest.mark.slow
def test_critic_free_estimator_builds_no_critic(tiny_model_dir, rm_dir, tmp_path, launcher):
    out = tmp_path / "grpo"
    code, stderr = launcher.run("train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data",
                                f"{DEMO}/ppo.jsonl", "--output_dir", out, "--num_updates", 1, "--advantage_estimator",
                                "grpo", "--num_samples_per_prompt", 2, "--no-whiten_advantages", "--kl_estimator",
                                "k3", *SMALL)
    assert code == 0, stderr[-3000:]
    assert not (out / "critic").exists()
    row = read_metrics(out)[0]
    assert row["loss/value_avg"] == 0.0
    # the KL that shaped the rewards is logged by its estimator's name, beside TRL's k1 objective/kl
    assert row["objective/kl_k3"] >= 0.0 and "objective/kl" in row and "objective/kl_k2" not in row


def ppo_args(sft, rm, **overrides):
    args = dict(sft=sft, rm=rm, finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                lora_target="all", trust_remote_code=False, critic_init="rm", gradient_checkpointing=False,
                max_length=256, response_length=48)
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
    assert m.plan == "two bases" and base_copies(m) == 2
    randomize_lora(m.policy)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("The common cold", "偏头痛会")]
    batch = generate(m.policy, prompts, 8, [tok.eos_token_id], tok.pad_token_id)
    mask = batch["response_mask"]
    sft = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = logprobs_of(sft, batch)
        with m.role("reference") as ref_policy:
            assert ref_policy is m.policy
            ref = logprobs_of(ref_policy, batch)
        policy = logprobs_of(m.policy, batch)
    assert torch.equal(torch.where(mask > 0, ref, 0.0), torch.where(mask > 0, expected, 0.0))
    assert (policy - expected).abs().max() > 1e-3  # the adapters do change the policy


def test_reward_is_the_rm_with_the_critic_adapters_off(tiny_model_dir, rm_dir):
    torch.manual_seed(0)
    m = build_models(ppo_args(tiny_model_dir, rm_dir), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert m.roles["reward"][0] is m.critic  # one base model for both
    randomize_lora(m.critic)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    query = torch.tensor([[tok.pad_token_id, 5, 6], [7, 8, 9]])
    query_mask = (query != tok.pad_token_id).long()
    response = torch.tensor([[10, tok.eos_token_id, tok.pad_token_id], [11, 12, 13]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # EOS in the middle; no EOS, full length
    batch = {"query": query, "query_mask": query_mask, "response": response, "response_mask": mask}
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        with m.role("reward") as reward_model:
            ours = reward_scores(reward_model, batch, m.reward_head)
        # transformers' own classifier on the same real tokens, one sequence at a time
        for i in range(2):
            ids = torch.cat([query[i][query_mask[i] > 0], response[i][mask[i] > 0]])[None]
            torch.testing.assert_close(ours[i], rm(input_ids=ids).logits[0, 0], rtol=1e-5, atol=1e-4)
        with_adapters = reward_scores(m.critic, batch, m.reward_head)
    assert (with_adapters - ours).abs().max() > 1e-3


def test_value_head_starts_as_the_reward_head(tiny_model_dir, rm_dir):
    m = build_models(ppo_args(tiny_model_dir, rm_dir), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert torch.equal(m.v_head.weight, m.critic.score.weight)
    assert m.v_head.weight.data_ptr() != m.critic.score.weight.data_ptr()  # a copy, trained on its own
    trainable = {n for n, p in m.critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


# ---------------------------------------------------------------- one base for all four roles

@pytest.fixture(scope="module")
def rm_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA reward adapter trained (here: randomised) on the SFT model, as train_rm.py writes it, and the
    same reward model merged (what the two-base plan reads)."""
    root = tmp_path_factory.mktemp("rm-adapter")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    add_lora(rm, r=4, alpha=8, exclude=["score"])
    randomize_lora(rm)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.3)
    save_adapter(rm, root / "adapter", base_model_name_or_path=os.path.abspath(tiny_model_dir), task_type="SEQ_CLS",
                 modules_to_save=["score"])
    tok.save_pretrained(root / "adapter")
    merge_lora(rm).save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return str(root / "adapter"), str(root / "merged")


def rollout_batch(m, tok):
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("I have a runny nose", "我头痛，怕光。", "Hi")]
    torch.manual_seed(5)
    with m.role("policy") as policy:
        batch = generate(policy, prompts, 8, [tok.eos_token_id], tok.pad_token_id)
    return {key: x.clone() for key, x in batch.items()}  # out of inference mode


def test_one_base_plan_scores_refers_and_values_as_the_two_base_plan(tiny_model_dir, rm_adapter):
    from nanorlhf import ppo
    from nanorlhf.forward import PolicyAndValue, critic_values

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter_dir, merged_dir = rm_adapter
    plans = {}
    for name, rm in (("one", adapter_dir), ("two", merged_dir)):
        torch.manual_seed(0)
        plans[name] = build_models(ppo_args(tiny_model_dir, rm), torch.device("cpu"), torch.float32, use_critic=True,
                                   tokenizer=tok)
    one, two = plans["one"], plans["two"]
    assert (one.plan, base_copies(one), two.plan, base_copies(two)) == ("one base", 1, "two bases", 2)
    with torch.no_grad():  # the same policy adapter on both (its random A is drawn in another order)
        for (_, a), (_, b) in zip(lora_state_dict(one.policy, "policy").items(), lora_state_dict(two.policy).items()):
            a.copy_(b)
    batch = rollout_batch(two, tok)
    assert torch.equal(batch["response"], rollout_batch(one, tok)["response"])  # the same policy sampled them
    mask, response = batch["response_mask"], batch["response"]
    outputs = {}
    for name, m in plans.items():
        with torch.no_grad():
            with m.role("reward") as model:
                scores = reward_scores(model, batch, m.reward_head)
            with m.role("reference") as model:
                ref = logprobs_of(model, batch)
            with m.role("critic") as model:
                values = critic_values(model, m.v_head, batch)
        # one PPO step on the policy: the loss and the policy after it
        advantages = ppo.masked_whiten(torch.linspace(-1, 1, mask.numel()).view_as(mask), mask)
        optimizer = torch.optim.AdamW(m.trainable(), lr=1e-2)
        logits, new_values = PolicyAndValue(m, 1.0)(batch)
        pg_loss, _ = ppo.policy_loss(ppo.logprobs_from_logits(logits, response), batch["logprobs"], advantages, mask,
                                     0.2)
        vf_loss, _ = ppo.value_loss(new_values, values, values + 1.0, mask, 0.2)
        (pg_loss + 0.1 * vf_loss).backward()
        optimizer.step()
        with torch.no_grad(), m.role("policy") as policy:
            after = logprobs_of(policy, batch)
        outputs[name] = dict(scores=scores, ref=ref * mask, values=values * mask, pg_loss=pg_loss, vf_loss=vf_loss,
                             after=after * mask)
    # equal in exact arithmetic, not in float32 rounding (base + adapter against a merged weight), which grows
    # with the values' size (scores and values of about 4) and differs between CPUs (AMX): a relative tolerance,
    # and a floor for values near 0 that carry their neighbours' rounding; an adapter off or 1% off moves them by 0.1
    for key, value in outputs["two"].items():
        torch.testing.assert_close(outputs["one"][key], value, rtol=1e-5, atol=1e-4, msg=lambda m: f"{key}: {m}")
    assert (outputs["one"]["after"] - outputs["one"]["ref"]).abs().max() > 1e-3  # the step did move the policy


def test_one_base_checkpoint_writes_peft_adapters_that_load_and_resume(tiny_model_dir, rm_adapter, tmp_path):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    m = build_models(ppo_args(tiny_model_dir, rm_adapter[0]), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=tok)
    randomize_lora(m.policy)
    m.save(str(tmp_path), tok)
    ids = torch.tensor([tok("I have a runny nose", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), m.role("policy") as policy:
        ours = policy(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-4)
    torch.manual_seed(0)
    fresh = build_models(ppo_args(tiny_model_dir, rm_adapter[0]), torch.device("cpu"), torch.float32, use_critic=True,
                         tokenizer=tok)
    fresh.load(str(tmp_path))
    for role in ("policy", "critic"):
        a = lora_state_dict(m.policy, role)
        b = lora_state_dict(fresh.policy, role)
        assert all(torch.equal(a[k], b[k]) for k in a), role
    assert torch.equal(m.v_head.weight, fresh.v_head.weight)


def test_an_rm_adapter_trained_on_another_base_is_refused(tiny_model_dir, rm_adapter, tmp_path):
    import shutil

    from nanorlhf.errors import UserError

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(UserError, match="the adapter was trained on .*, not on --sft"):
        build_models(ppo_args(str(other), rm_adapter[0]), torch.device("cpu"), torch.float32, use_critic=True,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))


def test_gradient_checkpointing_really_checkpoints_and_keeps_dropout_off(tiny_model_dir, rm_dir):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from nanorlhf.forward import PolicyAndValue

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = build_models(ppo_args(tiny_model_dir, rm_dir, gradient_checkpointing=checkpointing, lora_dropout=0.1),
                         torch.device("cpu"), torch.float32, use_critic=True, tokenizer=tok)
        layers = [mod for mod in m.policy.modules() if isinstance(mod, GradientCheckpointingLayer)]
        # transformers checkpoints a layer only in training mode: the layers are, their children are not
        assert all(layer.training == checkpointing for layer in layers)
        assert not any(mod.training for mod in m.policy.modules() if not isinstance(mod, GradientCheckpointingLayer))
        logits, values = PolicyAndValue(m, 1.0)(rollout_batch(m, tok))
        (logits.logsumexp(-1).mean() + values.mean()).backward()
        grads[checkpointing] = [p.grad.clone() for p in m.trainable()]
    # the same gradients, recomputed (dropout off: the second forward equals the first)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))
