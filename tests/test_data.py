"""Data: reading files, every record format, where the labels go, and one clear line for bad input.

Label tests use the real tiny tokenizer (the one train_pt.py saves) and compare against the ChatML
text written out by hand: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, and
`<|im_start|>assistant\\n` as the generation prompt.
"""

import itertools
import json

import pytest
from transformers import AutoTokenizer

from nanorlhf.data import (IGNORE, encode_dialogue, encode_prompt, pack_documents, prompt_messages,
                           read_records, render, to_messages, to_pair)
from nanorlhf.errors import UserError
from nanorlhf.template import prepare_tokenizer

GEN = "<|im_start|>assistant\n"  # the generation prompt


def turn(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def fresh_tok(tiny_model_dir):
    """A copy to change (its chat template) without touching the shared one."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def segments(tok, ids, labels):
    """[(labelled?, decoded text)] for each run of labelled / unlabelled tokens, in order."""
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels)), "a label differs from its input id"
    return [(labelled, tok.decode([i for i, _ in run]))
            for labelled, run in itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE)]


def encoded_segments(tok, rec):
    return segments(tok, *encode_dialogue(tok, to_messages(rec, "f.jsonl:1")))


def write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


# ---------------------------------------------------------------- labels, per format

def test_alpaca_labels_only_the_output(tok):
    rec = {"instruction": "Name a fruit.", "output": "An apple."}
    assert encoded_segments(tok, rec) == [(False, turn("user", "Name a fruit.") + GEN),
                                          (True, "An apple.<|im_end|>")]


def test_alpaca_input_follows_the_instruction_on_a_new_line(tok):
    rec = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert encoded_segments(tok, rec) == [(False, turn("user", "Translate to French.\nGood morning") + GEN),
                                          (True, "Bonjour<|im_end|>")]


def test_alpaca_empty_input_adds_nothing(tok):
    with_empty = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    without = {"instruction": "Say hi.", "output": "Hi"}
    assert to_messages(with_empty, "w") == to_messages(without, "w") == [user("Say hi."), assistant("Hi")]


def test_alpaca_history_and_system_come_first_and_every_answer_is_labelled(tok):
    rec = {"system": "Be brief.", "history": [["Hi", "Hello!"], ["Are you there?", "Yes."]],
           "instruction": "Bye", "output": "Goodbye."}
    assert encoded_segments(tok, rec) == [
        (False, turn("system", "Be brief.") + turn("user", "Hi") + GEN), (True, "Hello!<|im_end|>"),
        (False, "\n" + turn("user", "Are you there?") + GEN), (True, "Yes.<|im_end|>"),
        (False, "\n" + turn("user", "Bye") + GEN), (True, "Goodbye.<|im_end|>"),
    ]


def test_sharegpt_labels_every_assistant_turn_and_no_system_or_user_turn(tok):
    rec = {"conversations": [{"from": "system", "value": "You are a doctor."},
                             {"from": "human", "value": "I have a cough."},
                             {"from": "gpt", "value": "Since when?"},
                             {"from": "human", "value": "Two days."},
                             {"from": "gpt", "value": "Rest and drink water."}]}
    assert encoded_segments(tok, rec) == [
        (False, turn("system", "You are a doctor.") + turn("user", "I have a cough.") + GEN),
        (True, "Since when?<|im_end|>"),
        (False, "\n" + turn("user", "Two days.") + GEN),
        (True, "Rest and drink water.<|im_end|>"),
    ]


def test_sharegpt_system_field_becomes_the_system_turn(tok):
    rec = {"system": "Be kind.",
           "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    assert to_messages(rec, "w") == [system("Be kind."), user("Hi"), assistant("Hey")]


def test_messages_format_labels_assistant_turns(tok):
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                        {"role": "assistant", "content": "A2"}]}
    assert encoded_segments(tok, rec) == [
        (False, turn("system", "S") + turn("user", "Q1") + GEN), (True, "A1<|im_end|>"),
        (False, "\n" + turn("user", "Q2") + GEN), (True, "A2<|im_end|>"),
    ]


def test_input_ids_decode_to_exactly_the_rendered_chat_text(tok):
    messages = [system("S"), user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    ids, _ = encode_dialogue(tok, messages)
    expected = turn("system", "S") + turn("user", "Q1") + turn("assistant", "A1") + turn("user", "Q2") \
        + turn("assistant", "A2")
    assert render(tok, messages) == expected
    assert tok.decode(ids) == expected[:-1]  # the newline after the last <|im_end|> is neither label nor context


def test_every_answer_ends_with_eos(tok):
    ids, labels = encode_dialogue(tok, [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")])
    labelled = [i for i in labels if i != IGNORE]
    assert labelled.count(tok.eos_token_id) == 2
    assert tok.eos_token == "<|im_end|>"


def test_chinese_dialogue_labels_round_trip_exactly(tok):
    rec = {"conversations": [{"from": "human", "value": "医生，我头疼，还发烧，怎么办？"},
                             {"from": "gpt", "value": "可能是流感。多休息，多喝水。"},
                             {"from": "human", "value": "要吃药吗？😷"},
                             {"from": "gpt", "value": "如果高烧不退，请就医。"}]}
    assert encoded_segments(tok, rec) == [
        (False, turn("user", "医生，我头疼，还发烧，怎么办？") + GEN),
        (True, "可能是流感。多休息，多喝水。<|im_end|>"),
        (False, "\n" + turn("user", "要吃药吗？😷") + GEN), (True, "如果高烧不退，请就医。<|im_end|>"),
    ]


# ---------------------------------------------------------------- prompts (PPO)

@pytest.mark.parametrize("rec", [
    {"prompt": "Why is the sky blue?"},
    {"prompt": "Why is the sky blue?", "response": "Rayleigh scattering."},
    {"instruction": "Why is the sky blue?"},
    {"instruction": "Why is the sky blue?", "output": "Rayleigh scattering."},
    {"conversations": [{"from": "human", "value": "Why is the sky blue?"},
                       {"from": "gpt", "value": "Scattering."}]},
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}]},
], ids=["prompt", "prompt+response", "alpaca-no-output", "alpaca", "sharegpt", "messages"])
def test_prompt_messages_is_the_dialogue_without_its_final_answer(rec):
    assert prompt_messages(rec, "w") == [user("Why is the sky blue?")]


def test_multi_turn_prompt_keeps_earlier_answers(tok):
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                             {"from": "human", "value": "Help?"}]}
    messages = prompt_messages(rec, "w")
    assert messages == [user("Hi"), assistant("Hello"), user("Help?")]
    assert tok.decode(encode_prompt(tok, messages)) == turn("user", "Hi") + turn("assistant", "Hello") \
        + turn("user", "Help?") + GEN


def test_prompt_ids_end_with_the_generation_prompt(tok):
    ids = encode_prompt(tok, [user("你好")])
    assert tok.decode(ids) == turn("user", "你好") + GEN


# ---------------------------------------------------------------- the chat template

def test_tokenizer_without_chat_template_but_with_chatml_tokens_falls_back_to_chatml(tok, fresh_tok):
    messages = [user("Q"), assistant("A")]
    fresh_tok.chat_template = None
    assert prepare_tokenizer(fresh_tok, "m") == ["m: no chat template; using ChatML (saved with the outputs)"]
    assert render(fresh_tok, messages) == turn("user", "Q") + turn("assistant", "A")
    assert encode_dialogue(fresh_tok, messages) == encode_dialogue(tok, messages)


def test_template_without_eos_gets_eos_after_each_answer(fresh_tok):
    fresh_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, labels = encode_dialogue(fresh_tok, [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")])
    assert segments(fresh_tok, ids, labels) == [
        (False, "user: Q1\nassistant: "), (True, "A1\n<|im_end|>"),
        (False, "user: Q2\nassistant: "), (True, "A2\n<|im_end|>"),
    ]
    assert [i for i in labels if i != IGNORE].count(fresh_tok.eos_token_id) == 2


def test_template_that_does_not_render_turn_by_turn_is_refused(fresh_tok):
    # renders the dialogue newest turn first: a prefix of the dialogue is not a prefix of the text
    fresh_tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match=r"^f.jsonl:3: the chat template does not render turn by turn"):
        encode_dialogue(fresh_tok, [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")], "f.jsonl:3")


# ---------------------------------------------------------------- reading files

def test_txt_is_one_record_per_line_and_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path / "a.txt", "first\n\n   \nsecond\r\nthird")
    assert read_records(path) == [(f"{path}:1", {"text": "first"}), (f"{path}:4", {"text": "second"}),
                                  (f"{path}:5", {"text": "third"})]


def test_jsonl_names_each_record_by_its_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n\n{"text": "b"}\r\n')
    assert read_records(path) == [(f"{path}:1", {"text": "a"}), (f"{path}:3", {"text": "b"})]


def test_json_array_names_each_record_by_its_index(tmp_path):
    path = write(tmp_path / "a.json", '[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    assert read_records(path) == [(f"{path}: record 1", {"text": "a"}), (f"{path}: record 2", {"text": "b"})]


def test_comma_separated_paths_are_read_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "one\n")
    b = write(tmp_path / "b.jsonl", '{"text": "two"}\n')
    c = write(tmp_path / "c.json", '[{"text": "three"}]')
    expected = [(f"{a}:1", {"text": "one"}), (f"{b}:1", {"text": "two"}),
                (f"{c}: record 1", {"text": "three"})]
    assert read_records(f"{a},{b},{c}") == expected
    assert read_records([a, b, c]) == expected


@pytest.mark.parametrize("name,content", [("a.txt", "héllo\n"), ("a.jsonl", '{"text": "héllo"}\n'),
                                          ("a.json", '[{"text": "héllo"}]')])
def test_utf8_bom_is_ignored(tmp_path, name, content):
    path = write(tmp_path / name, b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert [rec for _, rec in read_records(path)] == [{"text": "héllo"}]


NON_ASCII = ["流感患者常常全身酸痛，还特别乏力。", "Café naïve façade — Ünïcödé", "emoji 😷🤒👨‍👩‍👧 done",
             "tabs\tand  two spaces", "  leading and trailing  "]


@pytest.mark.parametrize("escaped", [False, True], ids=["raw-utf8", "json-escaped"])
def test_non_ascii_text_round_trips_through_read_encode_decode(tmp_path, tok, escaped):
    lines = [json.dumps({"text": t}, ensure_ascii=escaped) for t in NON_ASCII]
    path = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    texts = [rec["text"] for _, rec in read_records(path)]
    assert texts == NON_ASCII
    assert [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in texts] == NON_ASCII


def test_non_ascii_txt_lines_round_trip(tmp_path, tok):
    path = write(tmp_path / "a.txt", "\n".join(NON_ASCII) + "\n")
    texts = [rec["text"] for _, rec in read_records(path)]
    assert texts == NON_ASCII


# ---------------------------------------------------------------- bad input: one line naming file:line

def read_and_parse(path):
    """What an SFT script does with a file: read every record and find its messages."""
    return [to_messages(rec, where) for where, rec in read_records(path)]


BAD_FILES = {  # name: (file name, bytes, expected message with {p} for the path)
    "empty jsonl": ("a.jsonl", b"", "{p}: file is empty (no records)"),
    "blank txt": ("a.txt", b"\n  \n\n", "{p}: file is empty (no records)"),
    "empty json": ("a.json", b"", "{p}: file is empty (no records)"),
    "empty json array": ("a.json", b"[]", "{p}: file is empty (no records)"),
    "malformed jsonl line": ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": "bad"\n',
                             "{p}:2: malformed JSON: Expecting ',' delimiter (column 17)"),
    "malformed json": ("a.json", b'[\n{"prompt": "ok"},\n{"prompt" "bad"}\n]',
                       "{p}: malformed JSON: Expecting ':' delimiter (line 3, column 11)"),
    "non-utf8 bytes": ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n',
                       "{p}:2: not valid UTF-8 (byte 15 of the line)"),
    "non-utf8 txt": ("a.txt", b"ok\n\nna\xefve\n", "{p}:3: not valid UTF-8 (byte 2 of the line)"),
    "line not an object": ("a.jsonl", b'{"prompt": "ok"}\n["prompt", "x"]\n',
                           "{p}:2: expected a JSON object, got list"),
    "json not an array": ("a.json", b'{"prompt": "x"}', "{p}: expected a JSON array of records, got dict"),
    "json record not an object": ("a.json", b'[{"prompt": "x"}, "y"]',
                                  "{p}: record 2: expected a JSON object, got str"),
    "conversations not a list": ("a.jsonl", b'{"conversations": {"from": "human", "value": "hi"}}\n',
                                 "{p}:1: field 'conversations' must be a list of turns, got dict"),
    "turn not an object": ("a.jsonl", b'{"messages": ["hi"]}\n',
                           "{p}:1: messages[1] must be an object, got str"),
    "unknown role": ("a.jsonl",
                     b'{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}',
                     "{p}:1: conversations[2] has unknown role 'robot' "
                     "(expected one of assistant, bot, function_call, gpt, human, observation, system, tool, user)"),
    "content not a string": ("a.jsonl", b'{"messages": [{"role": "user", "content": ["q"]}]}',
                             "{p}:1: field 'messages[1] content' must be a string, got list"),
    "missing turn content": ("a.jsonl",
                             b'\n{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}',
                             "{p}:2: missing field 'conversations[2] content'"),
    "instruction not a string": ("a.jsonl", b'{"instruction": 5, "output": "x"}',
                                 "{p}:1: field 'instruction' must be a string, got int"),
    "history not pairs": ("a.jsonl", b'{"instruction": "q", "output": "a", "history": [["only one"]]}',
                          "{p}:1: history[1] must be a [question, answer] pair"),
    "no known format": ("a.jsonl", b'{"question_text": "q", "answer": "a"}',
                        "{p}:1: record of no known format (fields: answer, question_text; "
                        "expected messages, conversations, instruction/output or prompt)"),
    "starts with the assistant": ("a.jsonl", b'{"messages": [{"role": "assistant", "content": "a"}]}',
                                  "{p}:1: a dialogue must start with a user turn"),
    "unknown extension": ("a.csv", b"text\nhello\n",
                          "{p}: unknown extension '.csv' (expected .txt, .json or .jsonl)"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_gives_one_line_naming_file_and_line(tmp_path, case):
    name, content, expected = BAD_FILES[case]
    path = write(tmp_path / name, content)
    with pytest.raises(UserError) as e:
        read_and_parse(path)
    assert str(e.value) == expected.format(p=path)
    assert "\n" not in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError) as e:
        read_records(str(tmp_path / "nope.jsonl"))
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_no_path_at_all_is_refused():
    with pytest.raises(UserError, match=r"^no data file given \(--data\)$"):
        read_records("")


def test_error_in_the_second_file_names_the_second_file(tmp_path):
    good = write(tmp_path / "good.jsonl", '{"prompt": "ok"}\n')
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError) as e:
        read_records(f"{good},{bad}")
    assert str(e.value).startswith(f"{bad}:2: malformed JSON")


# ---------------------------------------------------------------- preference pairs (RM)

def test_to_pair_medicalgpt_system_history_question():
    rec = {"system": "You are a doctor.", "history": [["Hi", "Hello, how can I help?"]],
           "question": "I cough.", "response_chosen": "Rest and drink water.",
           "response_rejected": "Ignore it."}
    prompt = [system("You are a doctor."), user("Hi"), assistant("Hello, how can I help?"), user("I cough.")]
    assert to_pair(rec, "w") == (prompt, "Rest and drink water.", "Ignore it.")


def test_to_pair_trl_prompt_chosen_rejected():
    rec = {"prompt": "我咳嗽。", "chosen": "多休息。", "rejected": "不用管。"}
    assert to_pair(rec, "w") == ([user("我咳嗽。")], "多休息。", "不用管。")


def test_to_pair_conversations_with_chosen_and_rejected_turns():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    assert to_pair(rec, "w") == ([system("S"), user("Q")], "good", "bad")


def test_to_pair_chosen_and_rejected_as_full_message_lists():
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rec = {"chosen": shared + [{"role": "assistant", "content": "good"}],
           "rejected": shared + [{"role": "assistant", "content": "bad"}]}
    assert to_pair(rec, "w") == ([system("S"), user("Q")], "good", "bad")


def test_to_pair_trl_conversational_prompt_with_answer_lists():
    rec = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    assert to_pair(rec, "w") == ([user("Q")], "good", "bad")


@pytest.mark.parametrize("rec,message", [
    ({"prompt": "Q", "chosen": "good"}, "f.jsonl:7: missing field 'rejected' (or 'response_rejected')"),
    ({"chosen": "good", "rejected": "bad"},
     "f.jsonl:7: missing field 'prompt' (or 'question', 'conversations')"),
    ({"prompt": "Q", "chosen": 1, "rejected": "bad"}, "f.jsonl:7: field 'chosen' must be a string, got int"),
    ({"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "Q"},
                                                                  {"role": "assistant", "content": "bad"}]},
     "f.jsonl:7: 'chosen' must end with an assistant turn"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "bad"}]},
     "f.jsonl:7: 'chosen' and 'rejected' must share the turns before the answer"),
], ids=["no rejected", "no prompt", "chosen not a string", "chosen without answer", "different prompts"])
def test_bad_pair_gives_one_line(rec, message):
    with pytest.raises(UserError) as e:
        to_pair(rec, "f.jsonl:7")
    assert str(e.value) == message


# ---------------------------------------------------------------- PT packing

def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pack_documents_puts_eos_after_every_document(tok):
    docs = ["first document", "第二个文档", "third 🙂"]
    stream = sum((ids_of(tok, d) + [tok.eos_token_id] for d in docs), [])
    assert pack_documents(tok, docs, block_size=len(stream)) == [stream]


def test_pack_documents_cuts_blocks_of_exactly_block_size_and_drops_the_tail(tok):
    docs = [f"document number {i} about colds and 流感" for i in range(20)]
    stream = sum((ids_of(tok, d) + [tok.eos_token_id] for d in docs), [])
    blocks = pack_documents(tok, docs, block_size=16)
    assert len(stream) % 16 != 0  # so there is a tail to drop
    assert len(blocks) == len(stream) // 16
    assert all(len(b) == 16 for b in blocks)
    assert sum(blocks, []) == stream[:len(blocks) * 16]
