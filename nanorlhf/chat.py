"""Talk to a model you trained: a streaming, multi-turn chat in the terminal.

    python -m nanorlhf.chat --model runs/demo/ppo-merged           # a merged model dir
    python -m nanorlhf.chat --model runs/demo/ppo                  # or a LoRA adapter dir
    python -m nanorlhf.chat --model runs/demo/sft-merged --prompt "我头痛，怎么办？"

The whole dialogue is rendered with the chat template every turn, as in training; the answer
is sampled one token at a time with a KV cache and printed as it comes. Type /reset to forget
the dialogue, /exit (or Ctrl-D) to quit; Ctrl-C stops an answer.
"""

import os
import sys

import torch
from transformers import DynamicCache

from nanorlhf.args import SEED_RANGE, ArgumentParser, pick_device
from nanorlhf.data import encode_prompt
from nanorlhf.errors import UserError, run_main
from nanorlhf.evaluate import load_policy
from nanorlhf.sampling import sample_token
from nanorlhf.template import stop_ids

PROMPT = ">>> "


@torch.inference_mode()
def stream_tokens(model, prompt_ids, max_new_tokens, eos_ids, temperature=0.7, top_k=0, top_p=1.0):
    """Yield sampled token ids one by one (EOS ends the answer and is not yielded). One sequence,
    no padding: the KV cache holds the prompt after the first forward, then one token per step."""
    input_ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    cache = DynamicCache(config=model.config)
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = sample_token(out.logits[:, -1].float(), temperature, top_k, top_p)
        if token.item() in eos_ids:
            return
        yield token.item()
        input_ids = token[:, None]


def stream_text(tokenizer, token_ids):
    """Turn a stream of token ids into a stream of text pieces that join to the full decode.

    A character may be spread over several tokens (byte fallback splits a Chinese character into
    its UTF-8 bytes); until its last byte arrives the decode ends with U+FFFD, so we wait for it
    and never print half a character."""
    def decode(ids):  # no clean-up of spaces: it would change text already printed ("a ," -> "a,")
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    ids, printed = [], ""
    for token in token_ids:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd") or not text.startswith(printed):
            continue
        yield text[len(printed):]
        printed = text
    text = decode(ids)  # whatever was held back (an unfinished character stays as U+FFFD)
    if text != printed:
        yield text[len(os.path.commonprefix([text, printed])):]


def fit_context(tokenizer, messages, max_positions, max_new_tokens):
    """Prompt ids of the dialogue, dropping the oldest turns until prompt + answer fit the model;
    None if even the last message alone is too long."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while turns:
        ids = encode_prompt(tokenizer, system + turns)
        if not max_positions or len(ids) + max_new_tokens <= max_positions:
            return ids, system + turns
        turns = turns[2:]  # one user message and its answer
    return None, messages


def answer(model, tokenizer, prompt_ids, args, eos_ids, out=None):
    """Stream the reply to the prompt to `out` (stdout); return its text. An answer that reaches
    --max_new_tokens without the end-of-turn token is marked as cut there."""
    out = out or sys.stdout
    pieces, count = [], [0]
    tokens = stream_tokens(model, prompt_ids, args.max_new_tokens, eos_ids, args.temperature, args.top_k, args.top_p)

    def counted(stream):
        for token in stream:
            count[0] += 1
            yield token

    try:
        for piece in stream_text(tokenizer, counted(tokens)):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        if count[0] == args.max_new_tokens:  # no end of turn came: the answer was cut, not finished
            out.write(f" [cut: no end of turn within --max_new_tokens {args.max_new_tokens}]")
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a merged model dir, a .gguf file or a LoRA adapter dir")
    parser.add_argument("--prompt", default="", help="answer this one message and exit")
    parser.add_argument("--system", default="", help="a system message")
    parser.add_argument("--temperature", type=float, default=0.7, range=">=0", help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, range=">=0", help="sample from the k likeliest (0 = off)")
    parser.add_argument("--top_p", type=float, default=1.0, range="[0,1]", help="nucleus sampling (1.0 = off)")
    parser.add_argument("--max_new_tokens", type=int, default=256, range=">0")
    parser.add_argument("--seed", type=int, default=None, range=SEED_RANGE, help="fix the sampling (default: random)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code")
    return parser


def main():
    args = build_parser().parse_args()
    device, dtype = pick_device(args.device)
    tokenizer, model = load_policy(args.model, device, dtype, args.trust_remote_code)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    eos_ids = set(stop_ids(tokenizer, model))  # the end of turn (e.g. Qwen's <|im_end|>) and the model's EOS ids
    max_positions = getattr(model.config, "max_position_embeddings", 0)
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt:
        ids, _ = fit_context(tokenizer, system + [{"role": "user", "content": args.prompt}], max_positions,
                             args.max_new_tokens)
        if ids is None:
            raise UserError(f"--prompt is longer than the model's {max_positions} positions "
                            f"(with --max_new_tokens {args.max_new_tokens})")
        answer(model, tokenizer, ids, args, eos_ids)
        return

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"chatting with {args.model}: /reset forgets the dialogue, /exit or Ctrl-D quits", file=sys.stderr)
    messages = list(system)
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(system)
            print("(dialogue cleared)")
            continue
        if not line:
            continue
        ids, fitted = fit_context(tokenizer, messages + [{"role": "user", "content": line}],
                                  max_positions, args.max_new_tokens)
        if ids is None:
            print(f"(message too long: the model reads at most {max_positions} tokens)")
            continue
        messages = fitted + [{"role": "assistant", "content": answer(model, tokenizer, ids, args, eos_ids)}]


if __name__ == "__main__":
    run_main(main)
