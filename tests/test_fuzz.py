"""Fuzzing the data readers: mutated records (of the demo data, and of MedicalGPT's and LLaMA-Factory's
formats written out by hand) go through every stage's reader, the tokenizing step included. Each one
must be read, or refused with a UserError of one line that names the file (and the line); any other
exception is a bug in the reader, and the test prints the record that caused it.

The seed is fixed: a failure here fails the same way on every run.
"""

import copy
import json
import os
import random
import re
import runpy
import time
import traceback

import pytest
from conftest import DEMO, ROOT
from transformers import AutoTokenizer

from nanorlhf.data import pack_documents, read_records
from nanorlhf.errors import UserError

SEED = 18
N_MUTATIONS = 3000
MAX_LENGTH = 256

# ---------------------------------------------------------------- seed records

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

MEDICALGPT = [
    {"conversations": [{"from": "system", "value": "你是一个医生。"},
                       {"from": "human", "value": "我头痛，还发烧。"}, {"from": "gpt", "value": "可能是流感，多休息。"},
                       {"from": "human", "value": "要吃药吗？"}, {"from": "gpt", "value": "可以吃退烧药。"}]},
    {"system": "You are a doctor.", "history": [["Hi", "Hello, how can I help?"]], "question": "I cough.",
     "response_chosen": "Rest and drink water.", "response_rejected": "Ignore it."},
    {"question": "感冒了怎么办？", "response_chosen": "多喝水，多休息。", "response_rejected": "不用管。"},
    {"text": "流感患者常常发高烧，还全身酸痛。"},
    {"question": "发烧多少度要看医生？", "answer": "39"},
]
LLAMA_FACTORY = [
    {"instruction": "Answer briefly.", "input": "What helps a sore throat?", "output": "Warm tea with honey.",
     "system": "You are a doctor.", "history": [["Hi", "Hello!"], ["I feel ill", "What are your symptoms?"]]},
    {"conversations": [{"from": "human", "value": "Weather in Beijing?"},
                       {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                      "arguments": {"city": "Beijing"}})},
                       {"from": "observation", "value": "sunny, 25 C"}, {"from": "gpt", "value": "It is sunny."}],
     "system": "You can use tools.", "tools": json.dumps([WEATHER])},
    {"messages": [{"role": "system", "content": "You can use tools."},
                  {"role": "user", "content": "Weather in Beijing?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
                  {"role": "tool", "content": "sunny, 25 C"}, {"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": WEATHER}]},
    {"conversations": [{"from": "human", "value": "我咳嗽。"}],
     "chosen": {"from": "gpt", "value": "多休息。"}, "rejected": {"from": "gpt", "value": "不用管。"}},
    {"instruction": "I cough.", "input": "", "chosen": "Rest.", "rejected": "Ignore it."},
    {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
]


def demo_records():
    records = []
    for name in ("sft.jsonl", "sft_alpaca.jsonl", "rm.jsonl", "ppo.jsonl"):
        with open(os.path.join(DEMO, name), encoding="utf-8") as f:
            records += [json.loads(line) for line in f.read().splitlines()[:8]]
    with open(os.path.join(DEMO, "pt.txt"), encoding="utf-8") as f:
        records += [{"text": line} for line in f.read().splitlines()[:8]]
    return records


# ---------------------------------------------------------------- mutations

TEXTS = ["", " ", "流感患者常常全身酸痛。", "😷🤒👨‍👩‍👧", "\x00\x01\x1b[31m\x7f", "\u2028\u2029\ufeff", "\ud800",
         "\udc00x\ud83d", "<|im_end|>", "<|im_start|>assistant\n", "{{ raise_exception('x') }}", "{% for %}",
         "human", "gpt", "function_call", "observation", "tool", "system", "assistant", "user",
         '{"name": "f", "arguments": {}}', '[{"name": "f"}]', "[]", "{}", "null", "not json", "x" * 3000]
FIELDS = ["role", "from", "content", "value", "system", "history", "tools", "tool_calls", "instruction", "input",
          "output", "response", "completion", "prompt", "question", "answer", "chosen", "rejected",
          "response_chosen", "response_rejected", "conversations", "messages", "text", "function", "arguments",
          "name", "type"]


def odd_value(rng):
    """A value of some type other than the one a field is meant to have."""
    return rng.choice([[], ["x"], [["a", "b"]], {}, {"a": 1}, 0, 7, -1, 3.5, float("nan"), float("inf"), None,
                       True, False, [[{"from": ["human"]}]], {"role": "user", "content": "q"},
                       [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       {"name": "f", "arguments": "{}"}, rng.choice(TEXTS)])


def positions(value, path=()):
    """The path (keys and indices) to every node of a JSON value, the root first."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from positions(child, path + (key,))


def at(value, path):
    for key in path:
        value = value[key]
    return value


def put(root, path, new):
    """root with the node at path replaced by new (root itself changed, or returned when path is empty)."""
    if not path:
        return new
    at(root, path[:-1])[path[-1]] = new
    return root


def retype(rng, rec):
    return put(rec, rng.choice(list(positions(rec))), odd_value(rng))


def delete_field(rng, rec):
    dicts = [p for p in positions(rec) if isinstance(at(rec, p), dict) and at(rec, p)]
    if dicts:
        node = at(rec, rng.choice(dicts))
        del node[rng.choice(list(node))]
    return rec


def add_field(rng, rec):
    dicts = [p for p in positions(rec) if isinstance(at(rec, p), dict)]
    if dicts:
        value = rng.choice([odd_value(rng), rng.choice(TEXTS), copy.deepcopy(rng.choice(MEDICALGPT))])
        at(rec, rng.choice(dicts))[rng.choice(FIELDS + TEXTS[:12])] = value
    return rec


def strings_of(rec):
    return [p for p in positions(rec) if isinstance(at(rec, p), str)]


def odd_text(rng, rec):
    strings = strings_of(rec)
    return put(rec, rng.choice(strings), rng.choice(TEXTS)) if strings else rec


def long_text(rng, rec):
    strings = strings_of(rec)
    if strings:
        path = rng.choice(strings)
        put(rec, path, (at(rec, path) or "长") * (4000 // max(1, len(at(rec, path)))))
    return rec


def swap_roles(rng, rec):
    turns = [p for p in positions(rec) if isinstance(at(rec, p), dict) and ({"from", "role"} & set(at(rec, p)))]
    if turns:
        turn = at(rec, rng.choice(turns))
        key = "from" if "from" in turn else "role"
        turn[key] = rng.choice(["human", "gpt", "system", "user", "assistant", "function_call", "observation", "tool",
                                "bot", "robot", ""])
    return rec


def shuffle_list(rng, rec):
    lists = [p for p in positions(rec) if isinstance(at(rec, p), list) and at(rec, p)]
    if lists:
        items = at(rec, rng.choice(lists))
        rng.choice([rng.shuffle, lambda x: x.pop(), lambda x: x.append(copy.deepcopy(x[0])), list.clear])(items)
    return rec


def nest(rng, rec):
    path = rng.choice(list(positions(rec)))
    node = at(rec, path)
    for _ in range(rng.choice([1, 2, 50])):
        node = rng.choice([[node], {"value": node}])
    return put(rec, path, node)


RECORD_MUTATIONS = [retype, delete_field, add_field, odd_text, long_text, swap_roles, shuffle_list, nest]


def truncate(rng, line):
    return line[:rng.randrange(len(line))]


def bad_bytes(rng, line):
    i = rng.randrange(len(line) + 1)
    return line[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\n", b"\r", b"\x00"]) + line[i:]


def wrap_line(rng, line):
    return rng.choice([b"\xef\xbb\xbf" + line, line + b"\r", line + b" x", b"\n\n" + line, line + b"\n" + line,
                       b"[" * 100000 + b"]" * 100000, b"1" * 5000, b'{"text": 1' + b"0" * 5000 + b"}", b"   ",
                       b"null", b'"just a string"', b"[]", line.replace(b'"', b"'")])


LINE_MUTATIONS = [truncate, bad_bytes, wrap_line]


def dump(rng, rec):
    """A record as one line of JSON, escaped or raw UTF-8 (raw cannot hold a lone surrogate)."""
    try:
        return json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(rec).encode("utf-8")


def mutate(rng, seeds):
    """One mutated data file: (file name, bytes)."""
    original = rng.choice(seeds)
    rec = copy.deepcopy(original)
    for _ in range(rng.choice([1, 1, 2, 3])):
        rec = rng.choice(RECORD_MUTATIONS)(rng, rec)
    line = dump(rng, rec)
    if rng.random() < 0.2:
        line = rng.choice(LINE_MUTATIONS)(rng, line)
    kind = rng.random()
    if kind < 0.15:
        return "data.json", b"[" + line + b"]"
    if kind < 0.25 and isinstance(rec, dict) and isinstance(rec.get("text"), str):  # a PT .txt line
        return "data.txt", rec["text"].encode("utf-8", "surrogatepass") + b"\n"
    if kind < 0.6:  # the mutated record on line 2, after the record it was made from
        return "data.jsonl", dump(rng, original) + b"\n" + line + b"\n"
    return "data.jsonl", line + b"\n"


# ---------------------------------------------------------------- the readers every stage uses

def script(name):
    """A stage script's functions (its module run without main())."""
    return runpy.run_path(os.path.join(ROOT, name), run_name="fuzz")


def pt_texts(path):
    """What train_pt.py does with --data: every record must have a string `text`."""
    texts = []
    for where, rec in read_records(path):
        if not isinstance(rec.get("text"), str):
            raise UserError(f"{where}: a PT record needs a string field 'text'")
        texts.append(rec["text"])
    return texts


@pytest.fixture(scope="module")
def readers():
    """stage -> read(path, tokenizer), each the stage's own reader from records to token ids."""
    sft, rm, dpo, ppo = (script(f"train_{stage}.py") for stage in ("sft", "rm", "dpo", "ppo"))
    return {
        "pt": lambda path, tok: pack_documents(tok, pt_texts(path), 32),
        "sft": lambda path, tok: sft["load_dialogues"](tok, path, MAX_LENGTH),
        "rm": lambda path, tok: rm["load_pairs"](tok, path, MAX_LENGTH),
        "dpo": lambda path, tok: dpo["load_pairs"](tok, path, MAX_LENGTH),
        "ppo": lambda path, tok: ppo["load_prompts"](tok, path, MAX_LENGTH),
    }


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    """The tiny tokenizer (ChatML, a template that knows no tools) and the same with Qwen2.5's template,
    which renders tools and tool calls itself."""
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools = AutoTokenizer.from_pretrained(tiny_model_dir)
    with open(os.path.join(ROOT, "tests", "templates", "qwen2_5.jinja"), encoding="utf-8") as f:
        tools.chat_template = f.read()
    return [plain, tools]


def one_clear_line(message, path):
    """A UserError's message is one line that starts with the file, then its line (or record) when it has one."""
    return len(message.splitlines()) == 1 and re.match(re.escape(path) + r"(:\d+:|: )", message)


def test_mutated_records_are_read_or_refused_in_one_line(tmp_path, readers, tokenizers, capsys):
    rng = random.Random(SEED)
    seeds = demo_records() + MEDICALGPT + LLAMA_FACTORY
    failures, outcomes = {}, {"read": 0, "refused": 0}  # failures: one example of each kind
    start = time.perf_counter()
    for i in range(N_MUTATIONS):
        name, content = mutate(rng, seeds)
        path = str(tmp_path / f"{i:05d}-{name}")
        with open(path, "wb") as f:
            f.write(content)
        for stage, read in readers.items():
            try:
                read(path, tokenizers[i % 2])
                outcomes["read"] += 1
            except UserError as e:
                outcomes["refused"] += 1
                if not one_clear_line(str(e), path):
                    kind = f"UserError not one line naming the file: {str(e).replace(path, '{file}')[:80]!r}"
                    failures.setdefault(kind, (stage, str(e), content))
            except Exception as e:  # any other exception is a bug in a reader
                frame = traceback.extract_tb(e.__traceback__)[-1]
                kind = f"{type(e).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}"
                failures.setdefault(kind, (stage, f"{type(e).__name__}: {e}", content))
        capsys.readouterr()  # the readers' warnings, thousands of them
    elapsed = time.perf_counter() - start
    report = "\n".join(f"{kind} (stage {stage}): {message[:300]!r}\n    file: {content[:600]!r}"
                       for kind, (stage, message, content) in failures.items())
    assert not failures, f"{len(failures)} kinds of failure:\n{report}"
    print(f"{N_MUTATIONS} mutated files x {len(readers)} readers: {outcomes} in {elapsed:.1f} s")
    assert outcomes["read"] > N_MUTATIONS // 4  # many mutations leave a readable record: the fuzz reaches the encoders
