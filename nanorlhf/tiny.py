"""The built-in tiny model: a SentencePiece tokenizer trained on your text and a small Llama-architecture model.

This is what `python train_pt.py` builds when no `--model` is given, so that the whole pipeline
runs on a laptop CPU with nothing to download. The result is an ordinary transformers directory:
`AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)` load it.
"""

import os
import re
import tempfile

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nanorlhf.errors import UserError
from nanorlhf.template import CHATML_TEMPLATE  # ChatML, Qwen2.5's format: what a student learns here carries over

# pad must differ from EOS: transformers' sequence classifier reads the last non-pad token, and
# a pad equal to EOS would make it read the wrong position (a classic reward-model bug).
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]

SIZES = {  # hidden, layers, heads, kv heads, mlp
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=768),
}


# Chinese, Japanese and Korean characters, and the full-width punctuation around them.
CJK = re.compile(r"([\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")
DELIMITER = "\ue000"  # a private-use character: never in real text


def train_tokenizer(texts, vocab_size=3000):
    """Train a SentencePiece unigram model on `texts` and wrap it as a transformers tokenizer.

    byte_fallback makes any character the training text never showed (a rare Chinese character,
    an emoji) fall back to its UTF-8 bytes, so every string round-trips exactly.

    Chinese is written without spaces, so left alone SentencePiece learns whole template phrases
    from a small corpus ("普通感冒的常见症状有流鼻涕" as one piece) and cuts the same symptom
    differently in every sentence: the model then never sees that two sentences share a word.
    Splitting at every CJK character while training (pretokenization_delimiter; encoding is
    unchanged) makes every Chinese piece one character, the same in every context.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(CJK.sub(DELIMITER + r"\1" + DELIMITER, t) for t in texts if t.strip()),
                pretokenization_delimiter=DELIMITER, model_prefix=prefix,
                vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
                character_coverage=1.0, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, user_defined_symbols=SPECIAL_TOKENS[2:],
                num_threads=2, minloglevel=2,
            )
        except RuntimeError as e:  # SentencePiece's own check would be a C++ traceback
            need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if need is None:
                raise
            raise UserError(f"--vocab_size {vocab_size} is too small for this data: its characters, the 256 "
                            f"bytes and the special tokens need {need[1]}") from None
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    # The same unigram model, expressed for the `tokenizers` library so transformers can save it
    # as tokenizer.json; the encoding is identical to SentencePiece's.
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, size="tiny", max_positions=512, seed=0):
    """A randomly initialised Llama-architecture causal LM sized for a CPU (about 1-5M parameters).

    Llama, not Qwen2: the blocks are the same (RMSNorm, RoPE, SwiGLU, grouped-query attention;
    Qwen2 only adds a bias to q/k/v), but transformers 5 loads any "qwen2" directory with its
    byte-level Qwen2Tokenizer whatever tokenizer_config.json says, which would silently replace
    our SentencePiece pipeline. A "llama" directory keeps the tokenizer it was saved with.
    """
    import torch

    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
