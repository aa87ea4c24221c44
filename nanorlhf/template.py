"""The chat format: how a dialogue becomes text, where a turn ends, and which token pads.

Every stage agrees on three things, all read from the tokenizer's own chat template:

- **End of turn.** The special token the template writes right after an assistant message
  (`<|im_end|>` for Qwen, `<|eot_id|>` for Llama-3, `<end_of_turn>` for Gemma, `<|end|>` for
  Phi-3, `</s>` for Mistral). SFT labels end at it (what the template writes after it, such as a
  newline, is context), the reward model scores at it, and the rollout stops at it and at every
  id of the model's `generation_config.eos_token_id`. A template that writes no special token
  after an answer gets the tokenizer's EOS appended instead.
- **Pad.** Never the end-of-turn token nor EOS: transformers' sequence classifier reads the last
  token that is not pad, so a pad equal to the token a score is read at would move the score.
  Where the tokenizer's pad is missing or clashes, an existing special token the data never uses
  is chosen (one named like a pad, then a reserved one, then unk), else `<pad>` is added.
- **No template.** ChatML where the tokenizer has `<|im_start|>`/`<|im_end|>` tokens, else
  PLAIN_TEMPLATE, which uses only the tokenizer's own BOS/EOS: no special-looking string is ever
  cut into text pieces.

Tool calls (sharegpt `function_call` / `observation`, or messages with `tool_calls` / role `tool`)
are rendered by the model's template when it knows tools (it mentions `tool_calls`), else in a
plain form: the tool list opens the first user message, a call is the assistant's answer (its
JSON text) and a result is a user message "Observation: ...".
"""

import json

from jinja2 import TemplateError

from nanorlhf.errors import UserError

# ChatML, the format Qwen2.5 uses; the built-in tiny tokenizer has it as its own template.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# For a tokenizer with neither a template nor ChatML tokens (a base Llama-2, TinyLlama, GPT-2...):
# plain role names, and the tokenizer's own EOS ends each answer. "Assistant:" is the generation
# prompt and the answer starts with its space, so a SentencePiece "▁word" is learnt as it is sampled.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
TOOLS_PREAMBLE = 'You can call these tools; to call one, answer with {"name": ..., "arguments": {...}}:\n'
_SENTINEL = "nanorlhf0answer0sentinel"  # survives `| trim` and never meets a special token


# ---------------------------------------------------------------- rendering

def template_knows_tools(tokenizer):
    return "tool_calls" in (tokenizer.chat_template or "")


def _plain_tools(messages):
    """Tool turns as ordinary turns, for a template that knows no tools (see the module docstring)."""
    tools = messages[0].get("tools")
    out = []
    for m in messages:
        if m["role"] == "tool":
            text = "Observation: " + m["content"]
            if out and out[-1]["role"] == "user" and out[-1].get("observation"):  # results of parallel calls
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "observation": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        out[first_user] = {**out[first_user], "content": TOOLS_PREAMBLE + listing + "\n\n" + out[first_user]["content"]}
    return [{"role": m["role"], "content": m["content"]} for m in out]


def render(tokenizer, messages, add_generation_prompt=False, where="<dialogue>"):
    """The text of a dialogue in the tokenizer's chat template.

    A record's tools travel with its first message (key "tools", see data.to_messages), so a
    dialogue stays one list of messages."""
    tools = messages[0].get("tools") if messages else None
    if template_knows_tools(tokenizer):
        tools = [{"type": "function", "function": t} for t in tools] if tools else None
        messages = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
        messages = [{**m, "content": ""} if m.get("tool_calls") else m for m in messages]  # the call is tool_calls
    else:
        tools, messages = None, _plain_tools(messages) if messages else messages
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            # Gemma-2's template refuses a system turn: it opens the first user message instead
            # (as Gemma-3's own template does, and LLaMA-Factory for Gemma)
            first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            return render(tokenizer, [first] + messages[2:], add_generation_prompt, where)
        raise UserError(f"{where}: the chat template refuses this dialogue: {e}") from None


# ---------------------------------------------------------------- end of turn, stop tokens

def end_of_turn(tokenizer):
    """(text, id, written) of the token that ends an assistant turn: the first special token the
    chat template writes after an answer (written=True), or the tokenizer's EOS when it writes
    none (written=False: the caller appends it)."""
    cached = getattr(tokenizer, "_nanorlhf_end_of_turn", None)
    if cached and cached[0] == tokenizer.chat_template:
        return cached[1]
    text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}])
    after = text[text.index(_SENTINEL) + len(_SENTINEL):]
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in after]
    if specials:  # the earliest one; of two starting at the same place, the longer
        marker = min(specials, key=lambda s: (after.index(s), -len(s)))
        result = (marker, tokenizer.convert_tokens_to_ids(marker), True)
    else:
        result = (tokenizer.eos_token, tokenizer.eos_token_id, False)
    tokenizer._nanorlhf_end_of_turn = (tokenizer.chat_template, result)
    return result


def stop_ids(tokenizer, model=None):
    """Every token that ends a response: the end of turn, EOS, and the model's
    generation_config.eos_token_id (an int or a list). Sorted, for a stable order."""
    ids = {end_of_turn(tokenizer)[1], tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(ids - {None})


# ---------------------------------------------------------------- preparing a tokenizer

def _choose_pad(tokenizer, taken):
    """An existing special token that is not taken and that the template never writes: one named
    like a pad, then a reserved one, then unk. None if there is none."""
    template = tokenizer.chat_template or ""
    specials = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    for wanted in ("pad", "reserved"):
        for i, content in specials:
            if wanted in content.lower() and i not in taken and content not in template:
                return content
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in taken:
        return tokenizer.unk_token
    return None


def prepare_tokenizer(tokenizer, where):
    """Give a tokenizer what every stage relies on: a chat template, and a pad token that is neither
    EOS nor the end of turn. Returns the lines to tell the user (empty when nothing changed); the
    changes are saved with every output (tokenizer.save_pretrained)."""
    said = []
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: the tokenizer has no EOS token")
    if not tokenizer.chat_template:
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            tokenizer.chat_template, name = CHATML_TEMPLATE, "ChatML"
        else:
            tokenizer.chat_template, name = PLAIN_TEMPLATE, "the plain User:/Assistant: format, answers end with EOS"
        said.append(f"{where}: no chat template; using {name} (saved with the outputs)")
    eot_text, eot_id, _ = end_of_turn(tokenizer)
    taken = {eot_id, tokenizer.eos_token_id}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in taken:
        why = ("has no pad token" if tokenizer.pad_token_id is None else
               f"pads with {tokenizer.pad_token!r}, which is its " + ("end of turn" if tokenizer.pad_token_id == eot_id
                                                                      else "EOS"))
        pad = _choose_pad(tokenizer, taken)
        if pad is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            said.append(f"{where}: the tokenizer {why}; added <pad> (id {tokenizer.pad_token_id}), "
                        "the model's embeddings grow by one row")
        else:
            tokenizer.pad_token = pad
            said.append(f"{where}: the tokenizer {why}; padding with {pad!r} (id {tokenizer.pad_token_id})")
    return said


# ---------------------------------------------------------------- the model side

def fit_model(model, tokenizer):
    """Make a loaded model agree with its prepared tokenizer: embeddings for an added <pad> (a zero
    row, the same every time it is added, so an adapter merges onto a base grown the same way), and
    the pad and stop ids in its config and generation_config, which save_pretrained writes, so
    transformers' generate() stops where nanorlhf does."""
    import torch

    rows = model.get_input_embeddings().weight.size(0)
    if tokenizer.pad_token_id >= rows:  # the <pad> prepare_tokenizer added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[rows:] = 0
            output = model.get_output_embeddings()
            if output is not None and output.weight.size(0) > rows:
                output.weight[rows:] = 0
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        generation_config.eos_token_id = stop_ids(tokenizer, model)
    return model
