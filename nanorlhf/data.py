"""Reading the data formats users already have, and turning them into token ids and labels.

Every record keeps where it came from ("file:line"), so a bad record, or a field of the wrong type
(each is checked before it is used), gets one clear line that names the file and the line. Chat
formatting is nanorlhf.template's (the tokenizer's own chat template); labels are set only on
assistant turns (every one of a multi-turn dialogue), up to and including the token that ends each turn.
"""

import json
import os
import re

import torch

from nanorlhf.errors import UserError
from nanorlhf.template import end_of_turn, render

IGNORE = -100  # label of a token that is context, not something the model should learn to say


# ---------------------------------------------------------------- reading files

EXTENSIONS = (".txt", ".json", ".jsonl")


def read_records(paths):
    """Read `.txt` (one document per line), `.json` (an array) or `.jsonl` files, or directories of them.

    `paths` is a list or a comma-separated string. Returns a list of (where, record) with where
    = "file:line" (or "file: record N" inside a .json array); a .txt line becomes {"text": line}.
    """
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    if not paths:
        raise UserError("no data file given (--data)")
    out = []
    for path in paths:
        for file in data_files(path):
            out += _read_file(file)
    return out


def data_files(path):
    """The files a --data path names: the file itself, or every .txt/.json/.jsonl file in a directory
    and its sub-directories (as MedicalGPT reads a --train_file_dir), in sorted order. Hidden files
    and folders are skipped, and so is LLaMA-Factory's dataset_info.json (it describes data, it is none)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file")
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [os.path.join(folder, name) for name in names
                  if os.path.splitext(name)[1].lower() in EXTENSIONS
                  and not name.startswith(".") and name != "dataset_info.json"]
    if not files:
        raise UserError(f"{path}: a directory with no .txt, .json or .jsonl file")
    return sorted(files)


def _read_file(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise UserError(f"{path}: unknown extension {ext!r} (expected .txt, .json or .jsonl)")
    with open(path, "rb") as f:
        raw = f.read()
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
    text = raw.decode("utf-8").lstrip("\ufeff")
    if not text.strip():  # fix: an empty .json file was reported as "malformed JSON", not as empty
        raise UserError(f"{path}: file is empty (no records)")
    out = []
    if ext == ".txt":
        out = [(f"{path}:{i}", {"text": line.rstrip("\r")}) for i, line in enumerate(text.split("\n"), 1)
               if line.strip()]
    elif ext == ".jsonl":
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                out.append((f"{path}:{i}", _parse_json(line, f"{path}:{i}", in_line=True)))
    else:
        data = _parse_json(text, path, want_object=False)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise UserError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}: record {i}", rec))
    if not out:
        raise UserError(f"{path}: file is empty (no records)")
    return out


def _parse_json(text, where, want_object=True, in_line=False):
    obj = _loads(text, where, "malformed JSON", in_line)
    if want_object and not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


# JSON may escape half of a UTF-16 surrogate pair alone ("\ud83d"): Python reads it as a string that is
# not Unicode text, and no tokenizer can encode it
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _loads(text, where, what, in_line):
    """json.loads; each way it fails is one line: "{where}: {what}: why"."""
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):  # rare: then check every string of the value
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        return value
    except json.JSONDecodeError as e:
        # fix: a .jsonl line is its own document, so json's "line 1" contradicted the file:line in `where`
        position = f"column {e.colno}" if in_line else f"line {e.lineno}, column {e.colno}"
        raise UserError(f"{where}: {what}: {e.msg} ({position})") from None
    except UnicodeEncodeError:
        raise UserError(f"{where}: {what}: a \\u escape of half a surrogate pair (\\ud800-\\udfff) "
                        "without the other half is not a character") from None
    except RecursionError:
        raise UserError(f"{where}: {what}: nested too deeply") from None
    except ValueError:  # an integer of more than 4300 digits
        raise UserError(f"{where}: {what}: a number too long to read") from None


# ---------------------------------------------------------------- formats -> messages

# A record's roles -> ours. "function_call" is an assistant turn that calls a tool (its value is the
# call as JSON: {"name", "arguments"} or a list of them); "observation" / "tool" is the tool's result.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _text(value, where, field, optional=False):
    """A string field. `optional`: an absent (or null) field reads as ""."""
    if value is None:  # fix: an absent field read "must be a string, got NoneType"
        if optional:
            return ""
        raise UserError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _one_line(text):
    """Text from the data, shown in a message: its line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _json_field(value, where, field):
    """A field that holds JSON: already parsed (a list or an object), or a string of it."""
    if isinstance(value, str):
        return _loads(value, where, f"field {field!r} is not valid JSON", in_line=True)
    return value


def _tool_calls(value, where, field):
    """A tool call as the data writes it -> the chat-template form [{"type": "function", "function":
    {"name", "arguments"}}]. Accepts {"name", "arguments"}, a list of them, or OpenAI's tool_calls."""
    calls = _json_field(value, where, field)
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise UserError(f"{where}: {field} is an empty list of tool calls")
    out = []
    for call in calls:
        call = call.get("function", call) if isinstance(call, dict) else call
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise UserError(f"{where}: {field} must be a tool call {{\"name\": ..., \"arguments\": ...}} "
                            "(or a list of them)")
        arguments = _json_field(call.get("arguments", {}), where, f"{field} arguments")
        if not isinstance(arguments, dict):
            raise UserError(f"{where}: field '{field} arguments' must be an object, got {type(arguments).__name__}")
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out


def _message_list(turns, where, field):
    """sharegpt turns ({"from","value"}) or messages ({"role","content"}, tool_calls) -> messages."""
    if not isinstance(turns, list):
        raise UserError(f"{where}: field {field!r} must be a list of turns, got {type(turns).__name__}")
    messages = []
    for j, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {field}[{j}] must be an object, got {type(turn).__name__}")
        role_key, content_key = ("from", "value") if "from" in turn and "role" not in turn else ("role", "content")
        role = _text(turn.get(role_key), where, f"{field}[{j}] {role_key}")
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise UserError(f"{where}: {field}[{j}] has unknown role {role!r} "
                            f"(expected one of {', '.join(sorted(ROLES))})")
        if role == "function_call":  # its value is the call
            calls = _tool_calls(content, where, f"{field}[{j}]")
            text = content if isinstance(content, str) else ""
        elif ROLES[role] == "assistant" and turn.get("tool_calls") not in (None, []):
            calls = _tool_calls(turn["tool_calls"], where, f"{field}[{j}]")
            text = _text(content, where, f"{field}[{j}] {content_key}", optional=True)
        else:
            messages.append({"role": ROLES[role], "content": _text(content, where, f"{field}[{j}] {content_key}")})
            continue
        # `content` is the call as plain text, for a template that knows no tools
        text = text or json.dumps([c["function"] for c in calls] if len(calls) > 1 else calls[0]["function"],
                                  ensure_ascii=False)
        messages.append({"role": "assistant", "content": text, "tool_calls": calls})
    return messages


def _tools(rec, where):
    """The record's `tools` (LLaMA-Factory: a JSON string of a list; or a list): function
    descriptions {"name", "description", "parameters"}, unwrapped from OpenAI's {"type", "function"}."""
    if rec.get("tools") in (None, "", []):
        return None
    tools = _json_field(rec["tools"], where, "tools")
    out = []
    for j, tool in enumerate(tools if isinstance(tools, list) else [tools], 1):
        if isinstance(tool, dict) and tool.get("type") == "function":
            tool = tool.get("function")
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str)):
            raise UserError(f"{where}: tools[{j}] must be a function description {{\"name\": ..., ...}}")
        out.append(tool)
    return out or None


def _history(rec, where):
    """MedicalGPT/alpaca `history`: [[question, answer], ...] before the current turn."""
    history = rec.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise UserError(f"{where}: field 'history' must be a list of [question, answer] pairs, "
                        f"got {type(history).__name__}")
    messages = []
    for j, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise UserError(f"{where}: history[{j}] must be a [question, answer] pair")
        messages += [{"role": "user", "content": _text(pair[0], where, f"history[{j}]")},
                     {"role": "assistant", "content": _text(pair[1], where, f"history[{j}]")}]
    return messages


def to_messages(rec, where):
    """Detect the format of an SFT/PPO record by its fields and return its messages.

    A `tools` field rides on the first message (key "tools"): the dialogue stays one list, and
    template.render hands the tools to the chat template."""
    system_text = _text(rec.get("system"), where, "system", optional=True)
    system = [{"role": "system", "content": system_text}] if system_text else []
    if "messages" in rec:
        messages = _message_list(rec["messages"], where, "messages")
    elif "conversations" in rec:
        messages = _message_list(rec["conversations"], where, "conversations")
    elif "instruction" in rec:
        user = _text(rec["instruction"], where, "instruction")
        extra = _text(rec.get("input"), where, "input", optional=True)
        messages = _history(rec, where) + [{"role": "user", "content": user + "\n" + extra if extra else user}]
        if "output" in rec:
            messages.append({"role": "assistant", "content": _text(rec["output"], where, "output")})
    elif "prompt" in rec or "question" in rec:
        field = "prompt" if "prompt" in rec else "question"
        if isinstance(rec[field], list):
            messages = _message_list(rec[field], where, field)
        else:
            messages = _history(rec, where) + [{"role": "user", "content": _text(rec[field], where, field)}]
        for answer in ("response", "completion", "output"):
            if rec.get(answer) is not None:
                messages.append({"role": "assistant", "content": _text(rec[answer], where, answer)})
    else:
        fields = ", ".join(_one_line(name) for name in sorted(rec)) or "none"
        raise UserError(f"{where}: record of no known format (fields: {fields}; "
                        "expected messages, conversations, instruction/output or prompt)")
    if messages and messages[0]["role"] == "system":
        system, messages = messages[:1], messages[1:]
    if not messages or messages[0]["role"] != "user":
        raise UserError(f"{where}: a dialogue must start with a user turn")
    messages = system + messages
    tools = _tools(rec, where)
    if tools:
        messages[0] = {**messages[0], "tools": tools}
    return messages


def prompt_messages(rec, where):
    """The prompt of a PPO record: the dialogue up to, not including, its final assistant turn
    (it ends with the user's message, or with a tool's result the model is to answer)."""
    messages = to_messages(rec, where)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if messages[-1]["role"] not in ("user", "tool"):
        raise UserError(f"{where}: the prompt must end with a user turn")
    return messages


def to_pair(rec, where):
    """A preference record -> (prompt messages, chosen answer, rejected answer).

    Accepts MedicalGPT's system/history/question/response_chosen/response_rejected, TRL's
    prompt/chosen/rejected, conversations + chosen + rejected, and chosen/rejected as message lists
    (the shared prompt being every turn before the last, unless a prompt field is given).
    """
    answers, dialogue = [], None
    for names in (("chosen", "response_chosen"), ("rejected", "response_rejected")):
        field = next((f for f in names if f in rec), None)
        if field is None:
            raise UserError(f"{where}: missing field {names[0]!r} (or {names[1]!r})")
        value = rec[field]
        if isinstance(value, list):  # a message list ending with the answer
            turns = _message_list(value, where, field)
            if not turns or turns[-1]["role"] != "assistant":
                raise UserError(f"{where}: {field!r} must end with an assistant turn")
            # fix: the shared prompt was silently taken from `rejected` even when it differed from `chosen`'s
            if dialogue is not None and turns[:-1] != dialogue:
                raise UserError(f"{where}: 'chosen' and 'rejected' must share the turns before the answer")
            dialogue, value = turns[:-1], turns[-1]["content"]
        elif isinstance(value, dict):  # {"from": "gpt", "value": ...} or {"role", "content"}
            value = _message_list([value], where, field)[0]["content"]
        answers.append(_text(value, where, field))
    rest = {k: v for k, v in rec.items() if k not in ("chosen", "rejected", "response_chosen", "response_rejected")}
    if any(f in rest for f in ("prompt", "question", "conversations", "messages", "instruction")):
        prompt = to_messages(rest, where)
    elif dialogue:
        prompt = to_messages({"messages": dialogue, "tools": rec.get("tools")}, where)
    else:
        raise UserError(f"{where}: missing field 'prompt' (or 'question', 'conversations')")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise UserError(f"{where}: the prompt must end with a user turn")
    return prompt, answers[0], answers[1]


def encode_pairs(paths, max_length, encode):
    """Every preference record of the files, encoded by encode(where, record, prompt, chosen, rejected) ->
    (pair, its longest sequence in tokens). Dropped, each kind counted in one line: a pair whose two
    answers are the same (it prefers nothing), and a pair longer than max_length (cutting it would cut
    off the end-of-turn token the reward model scores at, or part of the answer DPO compares)."""
    from nanorlhf.metrics import info

    pairs, same, too_long = [], [], 0
    for where, rec in read_records(paths):
        prompt, chosen, rejected = to_pair(rec, where)
        if chosen == rejected:
            same.append(where)
            continue
        pair, n_tokens = encode(where, rec, prompt, chosen, rejected)
        if n_tokens > max_length:
            too_long += 1
            continue
        pairs.append(pair)
    if same:
        info(f"warning: {len(same)} pairs with chosen == rejected were dropped, they prefer nothing "
             f"(first at {same[0]})")
    if too_long:
        info(f"warning: {too_long} pairs longer than --max_length {max_length} tokens were dropped")
    if not pairs:
        raise UserError(f"{paths}: no usable preference pair")
    return pairs


# ---------------------------------------------------------------- chat template -> ids

def _ids(tokenizer, text):
    """Token ids of `text` as it reads after a special token, which is where every piece of a chat
    starts (after <|im_end|>, <bos>, [/INST]...). Tokenized alone, a SentencePiece-style tokenizer
    (Llama-2, Mistral, Phi-3) would open each piece with a "▁" that the whole chat never has: the
    model would learn to begin every answer with a space it does not see when it generates."""
    if not text:
        return []
    ids = tokenizer(tokenizer.eos_token + text, add_special_tokens=False)["input_ids"]
    return ids[1:] if ids[0] == tokenizer.eos_token_id else tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_dialogue(tokenizer, messages, where="<dialogue>"):
    """Token ids and labels of a whole dialogue; labels only on the assistant turns.

    The chat template renders the dialogue once. Each assistant answer starts where the dialogue
    before it, rendered with the generation prompt, ends (so the context is exactly the prompt
    the policy is given at generation time); it ends with the template's end-of-turn token
    (template.end_of_turn), which is labelled. What the template writes after that token (a
    newline) is context for the next turn, and after the last answer it is dropped. A template
    that writes no end-of-turn token gets EOS appended to every answer.
    """
    eot_text, eot_id, written = end_of_turn(tokenizer)
    full = render(tokenizer, messages, where=where)
    input_ids, labels, done = [], [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        if len(prefix) < done or not full.startswith(prefix):
            raise UserError(f"{where}: the chat template does not render turn by turn; cannot place labels")
        if written:
            end = full.find(eot_text, len(prefix))
            if end < 0:
                raise UserError(f"{where}: the chat template wrote no {eot_text!r} after an assistant answer")
            end += len(eot_text)
            answer = _ids(tokenizer, full[len(prefix):end])
        else:
            end = len(render(tokenizer, messages[: i + 1], where=where))
            answer = _ids(tokenizer, full[len(prefix):end]) + [eot_id]
        context = _ids(tokenizer, full[done:len(prefix)])
        input_ids += context + answer
        labels += [IGNORE] * len(context) + answer
        done = end
    return input_ids, labels


def encode_prompt(tokenizer, messages, where="<dialogue>"):
    """Prompt ids ending with the generation prompt (e.g. '<|im_start|>assistant\\n')."""
    return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True, where=where))


def encode_answer(tokenizer, messages, answer, where="<dialogue>"):
    """The ids of prompt + answer, ending with the end-of-turn token: what the reward model scores.
    The same tokens SFT trains on, and the same the rollout samples (it stops at that token)."""
    ids, _ = encode_dialogue(tokenizer, messages + [{"role": "assistant", "content": answer}], where)
    return ids


def pack_documents(tokenizer, texts, block_size):
    """PT: concatenate documents with EOS between them and cut into blocks of block_size."""
    stream = []
    for text in texts:
        stream += _ids(tokenizer, text) + [tokenizer.eos_token_id]
    n = max(1, len(stream) // block_size)
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n)]


# ---------------------------------------------------------------- batching

def pad(sequences, value, side="right"):
    """Pad a list of id lists to one [B, T] long tensor."""
    width = max(len(s) for s in sequences)
    rows = [(s + [value] * (width - len(s))) if side == "right" else ([value] * (width - len(s)) + s)
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def pad_with_mask(sequences, pad_id, side="right"):
    """Token id lists -> (input_ids [B, T], attention_mask [B, T]: 1 on real tokens, 0 on padding)."""
    return pad(sequences, pad_id, side), pad([[1] * len(s) for s in sequences], 0, side)


def collate_lm(examples, pad_id):
    """[(input_ids, labels)] -> dict of input_ids, attention_mask, labels (right-padded)."""
    input_ids, attention_mask = pad_with_mask([e[0] for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad([e[1] for e in examples], IGNORE)}
