"""nanorlhf.chat: streaming decode, the KV-cached loop, the one-shot --prompt and the REPL in a pty."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanorlhf import chat
from nanorlhf.chat import stream_text, stream_tokens
from nanorlhf.data import encode_prompt
from nanorlhf.sampling import ended_with_eos, generate

# A question the 8-step fixture model answers with tokens, not with EOS at once (its greedy answer
# to "I have a headache and a fever." is empty, which would make the comparisons below vacuous).
QUESTION = "What could cause a runny nose?"


def greedy_answer(model_dir, question, max_new_tokens):
    """The reference: sampling.generate's greedy answer, decoded as a whole, as chat prints it (marked
    when it reached max_new_tokens without the end-of-turn token)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = encode_prompt(tok, [{"role": "user", "content": question}])
    batch = generate(model, [prompt], max_new_tokens, [tok.eos_token_id], tok.pad_token_id, 0.0)
    response, mask = batch["response"], batch["response_mask"]
    text = tok.decode(response[0][mask[0] > 0], skip_special_tokens=True).strip()
    if not ended_with_eos(response, [tok.eos_token_id])[0]:
        text += f" [cut: no end of turn within --max_new_tokens {max_new_tokens}]"
    return text


def test_an_answer_cut_at_the_limit_is_marked_and_an_ended_one_is_not(tiny_model_dir, monkeypatch):
    import io
    import types

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = encode_prompt(tok, [{"role": "user", "content": QUESTION}])
    args = types.SimpleNamespace(max_new_tokens=3, temperature=0.0, top_k=0, top_p=1.0)
    for tokens, marked in (([5, 6, 7], True), ([5, 6], False)):  # 3 tokens: the limit; 2: an end of turn came
        monkeypatch.setattr(chat, "stream_tokens", lambda *a, tokens=tokens, **k: iter(tokens))
        out = io.StringIO()
        chat.answer(None, tok, prompt, args, {tok.eos_token_id}, out)
        assert out.getvalue().endswith(" [cut: no end of turn within --max_new_tokens 3]\n") == marked


def test_stream_text_never_prints_half_a_character(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "龘偏头痛 ok 😀!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "<0xE9>" in tok.convert_ids_to_tokens(ids)  # 龘 is spread over its three UTF-8 bytes
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "龘" in pieces[0]  # printed whole, once its last byte arrived


def test_stream_tokens_with_kv_cache_matches_greedy_generate(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = encode_prompt(tok, [{"role": "user", "content": QUESTION}])
    streamed = list(stream_tokens(model, prompt, 12, {tok.eos_token_id}, temperature=0.0))
    response = generate(model, [prompt], 12, [tok.eos_token_id], tok.pad_token_id, 0.0)["response"]
    expected = [t for t in response[0].tolist() if t not in (tok.eos_token_id, tok.pad_token_id)]
    assert streamed == expected


def chat_argv(model_dir, *args):
    return [sys.executable, "-m", "nanorlhf.chat", "--model", model_dir, "--temperature", "0",
            "--max_new_tokens", "12", *args]


@pytest.mark.slow
def test_prompt_prints_one_answer_and_exits(tiny_model_dir):
    proc = subprocess.run(chat_argv(tiny_model_dir, "--prompt", QUESTION), check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    expected = greedy_answer(tiny_model_dir, QUESTION, 12)
    assert expected and proc.stdout.strip() == expected


@pytest.mark.slow
def test_repl_in_a_terminal_answers_resets_and_exits(tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    expected = greedy_answer(tiny_model_dir, QUESTION, 12)
    argv = chat_argv(tiny_model_dir)
    child = pexpect.spawn(argv[0], argv[1:], cwd=ROOT, encoding="utf-8", timeout=60,
                          env={**os.environ, "TQDM_DISABLE": "1", "TERM": "dumb"})
    try:
        child.expect_exact(">>> ")
        child.sendline(QUESTION)
        child.expect_exact(">>> ")  # the answer streams, then the prompt comes back
        assert expected in child.before.replace("\r\n", "\n")
        child.sendline("a second turn")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(dialogue cleared)")
        child.expect_exact(">>> ")
        child.sendline(QUESTION)  # with the history gone, the first answer again
        child.expect_exact(">>> ")
        assert expected in child.before.replace("\r\n", "\n")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_repl_quits_on_end_of_input(tiny_model_dir, monkeypatch, capsys):
    def ctrl_d(prompt):
        raise EOFError

    monkeypatch.setattr(sys, "argv", chat_argv(tiny_model_dir)[2:])
    monkeypatch.setattr("builtins.input", ctrl_d)
    chat.main()  # returns: the caller exits with status 0
    assert "/exit" in capsys.readouterr().err  # the banner said how to quit
