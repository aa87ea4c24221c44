"""LoRA: the formula, freezing, PEFT's on-disk format, merging, and disabling adapters.

Cross-checks against the real `peft` package (a dev dependency) on a tiny random Qwen2.
"""

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification)

from nanorlhf.errors import UserError
from nanorlhf.lora import (LoRALinear, active_adapter, add_lora, count_parameters, disable_adapters, load_adapter,
                           lora_state_dict, merge_lora, read_adapter_tensors, save_adapter, use_adapter)

peft = pytest.importorskip("peft")
# peft 0.21 calls a transformers 5 method that is deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TOL = dict(rtol=1e-5, atol=1e-4)  # logits by two computations equal in exact arithmetic, in float32


def tiny_config(**overrides):
    return Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, **overrides)


def causal_lm(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(tie_word_embeddings=True)).eval()  # as nanorlhf's tiny model


def reward_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(tiny_config(num_labels=1)).eval()


def input_ids(seed=1):
    torch.manual_seed(seed)
    return torch.randint(1, 128, (2, 9))  # no pad token (0), so the reward model reads the last one


def randomise_lora_B(model, seed=2):
    """B = 0 makes every adapter a no-op; a random B makes the checks below mean something."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for B in module.lora_B.values():
                nn.init.normal_(B.weight, std=0.1)
    return model


@torch.no_grad()
def logits(model, ids=None):
    return model(input_ids(1) if ids is None else ids).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- the layer ------------------------------------------------------------------------------------

def test_zero_initialised_adapter_leaves_logits_unchanged():
    base = causal_lm()
    expected = logits(base)
    model = add_lora(base, r=4, alpha=8)
    assert torch.equal(logits(model), expected)


def test_lora_linear_output_is_Wx_plus_alpha_over_r_BAx():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear(linear, r=2, alpha=6)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 6)
    W, b = linear.weight, linear.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.T + b + (6 / 2) * (x @ A.T @ B.T)
    assert layer.scaling["default"] == 3.0
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_weights_are_float32_over_a_bf16_base_and_the_output_keeps_the_base_dtype():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.bfloat16), r=2, alpha=4)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32  # as PEFT: precise updates over half-size frozen weights
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    assert layer(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_several_adapters_share_the_layers_and_the_active_one_is_applied():
    base = causal_lm()
    base_logits = logits(base)
    model = randomise_lora_B(add_lora(base, r=4, alpha=8, adapter="policy"), seed=2)
    policy_logits = logits(model)
    add_lora(model, r=2, alpha=2, adapter="critic")  # B = 0: the identity, and now the active one
    assert set(model.lora_configs) == {"policy", "critic"}
    assert torch.equal(logits(model), base_logits)
    with use_adapter(model, "policy"):
        assert torch.equal(logits(model), policy_logits)
    assert active_adapter(model) == "critic"
    with pytest.raises(ValueError, match="already has an adapter named 'policy'"):
        add_lora(model, adapter="policy")
    add_lora(model, targets="q_proj", adapter="third")  # on fewer layers: the others compute their base alone
    with use_adapter(model, "third"), disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
    assert torch.equal(logits(model), base_logits)  # "third" is active, and its B is 0


# --- add_lora ------------------------------------------------------------------------------------

def test_add_lora_freezes_everything_but_lora_weights():
    model = add_lora(causal_lm(), r=4, alpha=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n.replace(".default.", ".") for n in trainable} == set(lora_state_dict(model))
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # 2 layers x 7 linears, each A [4, in] + B [out, 4]
    in_out = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    expected = 2 * sum(4 * i + o * 4 for i, o in in_out)
    assert count_parameters(model)[0] == expected
    assert count_parameters(model)[1] == count_parameters(causal_lm())[1] + expected


def test_add_lora_all_wraps_every_linear_but_lm_head():
    model = add_lora(causal_lm(), targets="all")
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(wrapped) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert model.lora_configs["default"]["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]


def test_add_lora_all_skips_the_reward_head_and_exclude_list():
    model = add_lora(reward_model(), targets="all", exclude=["o_proj"])
    assert not isinstance(model.score, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.o_proj, LoRALinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


def test_add_lora_takes_comma_separated_targets():
    model = add_lora(causal_lm(), r=2, alpha=4, dropout=0.1, targets="q_proj, v_proj")
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert model.lora_configs == {"default": dict(r=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj"],
                                                  exclude=[])}


def test_add_lora_with_targets_matching_nothing_raises():
    with pytest.raises(UserError, match="^--lora_target query_key_value matches no nn.Linear"):
        add_lora(causal_lm(), targets=["query_key_value"])


# --- merge and disable ------------------------------------------------------------------------------

def test_merge_lora_puts_plain_linear_layers_back_with_the_same_logits():
    model = randomise_lora_B(add_lora(causal_lm(), r=4, alpha=8))
    expected = logits(model)
    merged = merge_lora(model)
    assert merged is model and not hasattr(merged, "lora_configs")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), expected, **TOL)


def test_disable_adapters_gives_the_base_logits_exactly_and_restores_after():
    base = causal_lm()
    base_logits = logits(base)
    model = randomise_lora_B(add_lora(base, r=4, alpha=8))
    adapted = logits(model)
    assert max_diff(adapted, base_logits) > 1e-3
    with disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
    assert torch.equal(logits(model), adapted)


def test_disable_adapters_restores_previous_flags_after_an_exception():
    model = randomise_lora_B(add_lora(causal_lm(), r=4, alpha=8))
    adapted = logits(model)
    model.model.layers[0].self_attn.q_proj.disabled = True  # a flag set before stays as it was
    flags = {n: m.disabled for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert flags == {n: m.disabled for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    model.model.layers[0].self_attn.q_proj.disabled = False
    assert torch.equal(logits(model), adapted)


# --- PEFT's format ------------------------------------------------------------------------------------

def test_save_adapter_writes_peft_config_and_key_names(tmp_path):
    model = add_lora(causal_lm(), r=4, alpha=8, targets="q_proj,v_proj")
    save_adapter(model, tmp_path, base_model_name_or_path="my-base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha",
                                   "target_modules", "bias", "modules_to_save")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "my-base", "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none", "modules_to_save": None}
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys == {"base_model.model." + k for k in lora_state_dict(model)}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_causal_lm_adapter_loads_in_peft_and_merges_to_the_same_logits(tmp_path):
    base = causal_lm()
    fresh_base = copy.deepcopy(base)
    model = randomise_lora_B(add_lora(base, r=4, alpha=8))
    ours = logits(model)
    save_adapter(model, tmp_path / "adapter")

    peft_model = peft.PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), ours, **TOL)

    merge_lora(model).save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(model), ours, **TOL)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), ours, **TOL)


def test_reward_model_adapter_with_trained_score_head_loads_in_peft_and_merges(tmp_path):
    base = reward_model()
    fresh_base = copy.deepcopy(base)
    model = randomise_lora_B(add_lora(base, r=4, alpha=8))
    model.score.requires_grad_(True)
    with torch.no_grad():
        model.score.weight.add_(1.0)  # the head was trained too
    ours = logits(model)
    save_adapter(model, tmp_path / "adapter", task_type="SEQ_CLS", modules_to_save=["score"])
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys  # PEFT's key for a modules_to_save weight

    peft_model = peft.PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), ours, **TOL)

    merge_lora(model).save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(model), ours, **TOL)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), ours, **TOL)


def test_save_then_load_adapter_round_trips_exactly(tmp_path):
    model = randomise_lora_B(add_lora(reward_model(), r=4, alpha=8, targets="q_proj,k_proj,v_proj"))
    with torch.no_grad():
        model.score.weight.mul_(-2.0)
    save_adapter(model, tmp_path, task_type="SEQ_CLS", modules_to_save=["score"])

    loaded = load_adapter(reward_model(), tmp_path)
    assert loaded.lora_configs["default"] == dict(r=4, alpha=8, dropout=0.0, targets=["q_proj", "k_proj", "v_proj"],
                                                  exclude=["score"], modules_to_save=["score"])
    ours, theirs = lora_state_dict(model), lora_state_dict(loaded)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded.score.weight, model.score.weight)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_load_adapter_reads_an_adapter_written_by_peft(tmp_path, task):
    make_model = causal_lm if task == "CAUSAL_LM" else reward_model
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type=task, init_lora_weights=False)  # False: B random, not zero
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(make_model(), config).eval()
    if task == "SEQ_CLS":
        with torch.no_grad():
            peft_model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(tmp_path)

    model = load_adapter(make_model(), tmp_path)
    torch.testing.assert_close(logits(model), logits(peft_model), **TOL)
    assert max_diff(logits(model), logits(make_model())) > 1e-3  # the adapter really changed something


def test_load_adapter_with_a_missing_key_raises_naming_the_key(tmp_path):
    save_adapter(add_lora(causal_lm(), r=4, alpha=8, targets="q_proj"), tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    missing = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del tensors[missing]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + re.escape(missing)):
        load_adapter(causal_lm(), tmp_path)


def test_load_adapter_with_an_unexpected_key_raises_naming_the_key(tmp_path):
    save_adapter(add_lora(causal_lm(), r=4, alpha=8, targets="q_proj"), tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="unexpected key .*k_proj.lora_A.weight"):
        load_adapter(causal_lm(), tmp_path)


def test_a_reward_adapter_loads_as_a_second_adapter_of_a_causal_lm_and_its_head_is_read_apart(tmp_path):
    rm = randomise_lora_B(add_lora(reward_model(), r=4, alpha=8))
    save_adapter(rm, tmp_path, task_type="SEQ_CLS", modules_to_save=["score"])
    model = add_lora(causal_lm(), r=4, alpha=8, adapter="policy")
    load_adapter(model, tmp_path, adapter="reward")
    assert active_adapter(model) == "reward" and set(model.lora_configs) == {"policy", "reward"}
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(model, "reward").values(),
                                                 lora_state_dict(rm).values()))
    assert torch.equal(read_adapter_tensors(tmp_path, ["score"])["score.weight"], rm.score.weight)
