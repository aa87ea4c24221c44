"""Tiny random models with the tokenizer configurations of the models users bring (nothing downloaded).

Each configuration reproduces what matters about a real model's files: its special tokens and which
of them are bos / eos / pad, its chat template (tests/templates/, copied from the models'
tokenizer_config.json), its generation_config.json eos_token_id list, and its transformers
architecture. The vocabulary itself is a small BPE trained here on the demo corpus: byte-level
like Qwen's and Llama-3's, or SentencePiece-style ("▁" for spaces) like Llama-2's, Mistral's,
Gemma's and Phi-3's.
"""

import functools
import os

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(HERE), "data", "demo")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_WORDS = ["<tool_call>", "</tool_call>"]  # added tokens that are not special, as in Qwen2.5
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]  # Llama-2, Mistral, TinyLlama: ids 0, 1, 2
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                 "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
                 "<|placeholder6|>", "<|user|>"]

# name: the tokenizer (style, special tokens, bos/eos/pad, template file) and the model
# (architecture, generation_config eos) as the real model ships them.
CONFIGS = {
    "qwen2.5-base": dict(style="bytelevel", specials=QWEN_SPECIALS, words=QWEN_WORDS, bos=None,
                         eos="<|endoftext|>", pad="<|endoftext|>", template="qwen2_5_base", arch="qwen2",
                         generation_eos=["<|endoftext|>"]),
    "qwen2.5-instruct": dict(style="bytelevel", specials=QWEN_SPECIALS, words=QWEN_WORDS, bos=None,
                             eos="<|im_end|>", pad="<|endoftext|>", template="qwen2_5", arch="qwen2",
                             generation_eos=["<|im_end|>", "<|endoftext|>"]),
    "qwen3": dict(style="bytelevel", specials=QWEN_SPECIALS, words=QWEN_WORDS + ["<think>", "</think>"], bos=None,
                  eos="<|im_end|>", pad="<|endoftext|>", template="qwen3", arch="qwen3",
                  generation_eos=["<|im_end|>", "<|endoftext|>"]),
    "llama3-instruct": dict(style="bytelevel", specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>",  # as users save it
                            eos="<|end_of_text|>", pad="<|end_of_text|>", template="llama3", arch="llama",
                            generation_eos=["<|end_of_text|>", "<|eot_id|>"]),
    "llama3.1-no-pad": dict(style="bytelevel", specials=LLAMA31_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                            pad=None, template="llama3", arch="llama",
                            generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "gemma2": dict(style="sentencepiece", specials=GEMMA_SPECIALS, bos="<bos>", eos="<eos>", pad="<pad>",
                   unk="<unk>", template="gemma2", arch="gemma2", generation_eos=["<eos>", "<end_of_turn>"]),
    "phi3": dict(style="sentencepiece", specials=PHI3_SPECIALS, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                 unk="<unk>", template="phi3", arch="phi3",
                 generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"]),
    "mistral": dict(style="sentencepiece", specials=SP_SPECIALS, bos="<s>", eos="</s>", pad=None, unk="<unk>",
                    template="mistral", arch="mistral", generation_eos=["</s>"]),
    "tinyllama": dict(style="sentencepiece", specials=SP_SPECIALS, bos="<s>", eos="</s>", pad="<unk>", unk="<unk>",
                      template=None, arch="llama", generation_eos=["</s>"]),
    "gpt2-like": dict(style="bytelevel", specials=["<|endoftext|>"], bos=None, eos="<|endoftext|>", pad=None,
                      template=None, arch="llama", generation_eos=["<|endoftext|>"]),
}

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


@functools.lru_cache(maxsize=None)
def corpus():
    """The demo world's text: every dialogue and answer the tests train on is drawn from it."""
    import json

    texts = [line for line in open(os.path.join(DEMO, "pt.txt"), encoding="utf-8").read().splitlines() if line]
    for name in ("sft.jsonl", "rm.jsonl", "ppo.jsonl"):
        for line in open(os.path.join(DEMO, name), encoding="utf-8"):
            rec = json.loads(line)
            texts += [t["value"] for t in rec.get("conversations", [])]
            texts += [rec[k] for k in ("prompt", "chosen", "rejected") if isinstance(rec.get(k), str)]
    texts += ['{"name": "get_weather", "arguments": {"city": "Beijing"}}', "Observation: sunny, 25 C",
              "User: Assistant: System: You are a helpful assistant.",
              "".join(map(chr, range(32, 127))) + "\n\t\n\n"]  # every ASCII character has a piece
    return tuple(texts)


def train_tokenizer(cfg, vocab_size=800):
    """A small BPE with the configuration's special tokens, wrapped as transformers saves it."""
    if cfg["style"] == "bytelevel":  # Qwen, Llama-3, GPT-2: bytes as symbols, no unknown token
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:  # SentencePiece-style (Llama-2, Mistral, Gemma, Phi-3): "▁" marks a space
        tok = Tokenizer(models.BPE(unk_token=cfg["unk"]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cfg["unk"]], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in cfg["specials"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in cfg.get("words", [])])
    names = {k: cfg.get(k) for k in ("bos", "eos", "pad", "unk")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in names.items() if v})
    if cfg["template"]:
        with open(os.path.join(HERE, "templates", cfg["template"] + ".jinja"), encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    return tokenizer


def build(name, out_dir, seed=0):
    """Save a tokenizer of configuration `name` and a random tiny model of its architecture to out_dir."""
    cfg = CONFIGS[name]
    tokenizer = train_tokenizer(cfg)
    ids = {k: tokenizer.convert_tokens_to_ids(cfg[k]) if cfg.get(k) else None for k in ("bos", "eos", "pad")}
    extra = {"head_dim": 8} if cfg["arch"] in ("gemma2", "qwen3") else {}
    config = AutoConfig.for_model(cfg["arch"], vocab_size=len(tokenizer), bos_token_id=ids["bos"],
                                  eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=True,
                                  **SIZES, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in cfg["generation_eos"]])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
