"""The built-in tiny model: its SentencePiece tokenizer round-trips any text, encodes exactly as
SentencePiece does, and survives save/load as an ordinary transformers directory."""

import os
import types

import pytest
import sentencepiece
import torch
from conftest import DEMO
from transformers import AutoModelForCausalLM, AutoTokenizer

import nanorlhf.tiny as tiny
from nanorlhf.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_model, train_tokenizer

PT_LINES = open(os.path.join(DEMO, "pt.txt"), encoding="utf-8").read().splitlines()
TEXTS = [
    "流感患者常常全身酸痛，还特别乏力。",
    "If you have watery eyes and an itchy nose, it may be a seasonal allergy.",
    "emoji 😷🤒 and a family 👨‍👩‍👧 and a flag 🇨🇳",
    "Café naïve façade Ünïcödé e\u0301 ß",
    "  two leading spaces, trailing  ",
    "tabs\tnew\nlines\r\nand\u3000ideographic\u00a0spaces",
    "\n\n",
    "数字 123 and 4.56e7",
    "罕见字：龘靐齉爩",
    "<|im_start|>user\n你好<|im_end|>\n",
]


@pytest.fixture(scope="module")
def trained():
    """(tokenizer, the SentencePiece processor it was built from), trained on the demo corpus."""
    captured = []

    class Capture(sentencepiece.SentencePieceProcessor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self)

    real = tiny.spm
    tiny.spm = types.SimpleNamespace(SentencePieceTrainer=real.SentencePieceTrainer,
                                     SentencePieceProcessor=Capture)
    try:
        tokenizer = train_tokenizer(PT_LINES)
    finally:
        tiny.spm = real
    assert len(captured) == 1
    return tokenizer, captured[0]


@pytest.fixture(scope="module")
def tokenizer(trained):
    return trained[0]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(ids(tokenizer, text)) == text


def test_unseen_characters_fall_back_to_bytes_not_unk(tokenizer):
    assert tokenizer.unk_token_id not in ids(tokenizer, "罕见字：龘靐齉爩 🦩")


@pytest.mark.parametrize("text", TEXTS[:-1] + PT_LINES[:200:7])
def test_encoding_equals_sentencepiece(trained, text):
    tokenizer, sp = trained
    assert ids(tokenizer, text) == sp.encode(text)


def test_vocabulary_equals_sentencepiece(trained):
    tokenizer, sp = trained
    assert len(tokenizer) == sp.get_piece_size()
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(sp.get_piece_size())] == \
        [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def test_special_tokens_are_single_ids_and_pad_differs_from_eos(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<|im_end|>", "<unk>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert ids(tokenizer, "<|im_start|><|im_end|>") == [2, 3]


def test_no_bos_or_eos_is_added_by_default(tokenizer):
    assert tokenizer("hello")["input_ids"] == ids(tokenizer, "hello")


def test_tokenizer_has_the_chatml_template(tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_saved_tokenizer_and_model_load_back_unchanged(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ids(loaded, text) == ids(tokenizer, text)
        assert loaded.decode(ids(loaded, text)) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.chat_template) == \
        (tokenizer.pad_token_id, tokenizer.eos_token_id, CHATML_TEMPLATE)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([ids(tokenizer, TEXTS[0])])
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_train_pt_output_dir_loads_with_auto_classes_and_round_trips(tiny_model_dir):
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(loaded)
    assert model.config.pad_token_id == loaded.pad_token_id
    assert model.config.eos_token_id == loaded.eos_token_id
    assert loaded.pad_token_id != loaded.eos_token_id
    for text in TEXTS:
        assert loaded.decode(ids(loaded, text)) == text
    assert loaded.chat_template == CHATML_TEMPLATE


def test_tiny_model_has_a_few_million_parameters_or_less(tokenizer):
    # tied input/output embeddings count once
    n = sum(p.numel() for p in build_tiny_model(tokenizer, size="tiny").parameters())
    assert 500_000 < n < 5_000_000


def test_small_model_is_bigger_but_still_a_cpu_model(tokenizer):
    tiny_n = sum(p.numel() for p in build_tiny_model(tokenizer, size="tiny").parameters())
    small_n = sum(p.numel() for p in build_tiny_model(tokenizer, size="small").parameters())
    assert tiny_n < small_n < 10_000_000


def test_model_is_built_deterministically_from_the_seed(tokenizer):
    a, b = build_tiny_model(tokenizer, seed=3), build_tiny_model(tokenizer, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_chinese_pieces_are_single_characters(tokenizer):
    """A small corpus once gave pieces like "普通感冒的常见症状有流鼻涕": the same symptom was cut
    differently in every sentence, and the model never learnt Chinese symptoms (it named the right
    condition for 10% of Chinese prompts, 96% of English ones)."""
    cjk = [p for p in tokenizer.get_vocab() if tiny.CJK.search(p)]
    assert cjk, "the demo corpus has Chinese: some pieces must be Chinese characters"
    assert all(len(p.replace("▁", "")) == 1 for p in cjk), [p for p in cjk if len(p.replace("▁", "")) > 1][:5]
    symptom = ids(tokenizer, "流鼻涕")
    for context in ("我流鼻涕。", "普通感冒的常见症状有流鼻涕、喉咙痛。", "如果流鼻涕，可能是普通感冒。"):
        sequence = ids(tokenizer, context)
        assert any(sequence[i:i + len(symptom)] == symptom for i in range(len(sequence))), context
