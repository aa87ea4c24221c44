"""Data: reading files, every record format, where the labels go, and one clear line for bad input.

Label tests use the real tiny tokenizer (the one train_pt.py saves) and compare against the ChatML
text written out by hand: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, and
`<|im_start|>assistant\\n` as the generation prompt.
"""

import itertools
import json
import os
import runpy

import pytest
from conftest import ROOT, demo_subset, read_metrics, run_script
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
                             "{p}:2: missing field 'conversations[2] value'"),
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
    "lone surrogate escape": ("a.jsonl", b'{"prompt": "ok \\ud83d\\ude37"}\n{"prompt": "\\ud83d"}\n',
                              "{p}:2: malformed JSON: a \\u escape of half a surrogate pair (\\ud800-\\udfff) "
                              "without the other half is not a character"),
    "lone surrogate in a JSON string field": (
        "a.jsonl", b'{"prompt": "q", "tools": "[{\\"name\\": \\"\\\\udc00\\"}]"}\n',
        "{p}:1: field 'tools' is not valid JSON: a \\u escape of half a surrogate pair (\\ud800-\\udfff) "
        "without the other half is not a character"),
    "nested too deeply": ("a.jsonl", b"[" * 100000 + b"]" * 100000, "{p}:1: malformed JSON: nested too deeply"),
    "number too long": ("a.json", b'[{"prompt": "q", "id": 1' + b"0" * 5000 + b"}]",
                        "{p}: malformed JSON: a number too long to read"),
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


def test_a_surrogate_pair_escape_is_one_character(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "\\ud83d\\ude37 mask"}\n')
    assert read_records(path) == [(f"{path}:1", {"text": "😷 mask"})]


# ---------------------------------------------------------------- every field of a record has its type checked

ASK, ANSWER = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
CALL = {"type": "function", "function": {"name": "f", "arguments": {}}}
WRONG_FIELDS = {  # name: (record, message after "f.jsonl:3: ")
    "role a list": ({"messages": [{"role": ["user"], "content": "q"}]},
                    "field 'messages[1] role' must be a string, got list"),
    "role an object": ({"messages": [{"role": {"name": "user"}, "content": "q"}]},
                       "field 'messages[1] role' must be a string, got dict"),
    "from a list": ({"conversations": [{"from": ["human"], "value": "q"}, ANSWER]},
                    "field 'conversations[1] from' must be a string, got list"),
    "from an object": ({"conversations": [ASK, {"from": {"gpt": 1}, "value": "a"}]},
                       "field 'conversations[2] from' must be a string, got dict"),
    "role missing": ({"messages": [{"content": "q"}]}, "missing field 'messages[1] role'"),
    "value a number": ({"conversations": [ASK, {"from": "gpt", "value": 5}]},
                       "field 'conversations[2] value' must be a string, got int"),
    "system a list": ({"system": ["S"], "conversations": [ASK, ANSWER]}, "field 'system' must be a string, got list"),
    "system false": ({"system": False, "conversations": [ASK, ANSWER]}, "field 'system' must be a string, got bool"),
    "instruction a list": ({"instruction": ["q"], "output": "a"}, "field 'instruction' must be a string, got list"),
    "input zero": ({"instruction": "q", "input": 0, "output": "a"}, "field 'input' must be a string, got int"),
    "output an object": ({"instruction": "q", "output": {"text": "a"}}, "field 'output' must be a string, got dict"),
    "history an object": ({"instruction": "q", "output": "a", "history": {"q": "a"}},
                          "field 'history' must be a list of [question, answer] pairs, got dict"),
    "history empty string": ({"instruction": "q", "output": "a", "history": ""},
                             "field 'history' must be a list of [question, answer] pairs, got str"),
    "history answer a number": ({"instruction": "q", "output": "a", "history": [["q0", 1]]},
                                "field 'history[1]' must be a string, got int"),
    "question a number": ({"question": 7}, "field 'question' must be a string, got int"),
    "prompt an object": ({"prompt": {"role": "user", "content": "q"}}, "field 'prompt' must be a string, got dict"),
    "response a list": ({"prompt": "q", "response": ["a"]}, "field 'response' must be a string, got list"),
    "tools a number": ({"conversations": [ASK, ANSWER], "tools": 5},
                       'tools[1] must be a function description {"name": ..., ...}'),
    "tool without a name": ({"conversations": [ASK, ANSWER], "tools": '[{"description": "d"}]'},
                            'tools[1] must be a function description {"name": ..., ...}'),
    "tool call arguments a list": ({"conversations": [ASK, {"from": "function_call",
                                                            "value": '{"name": "f", "arguments": [1]}'}]},
                                   "field 'conversations[2] arguments' must be an object, got list"),
    "no tool call": ({"conversations": [ASK, {"from": "function_call", "value": "[]"}]},
                     "conversations[2] is an empty list of tool calls"),
    "content of a tool call a number": ({"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": 5, "tool_calls": [CALL]}]},
                                        "field 'messages[2] content' must be a string, got int"),
}


@pytest.mark.parametrize("case", list(WRONG_FIELDS))
def test_a_field_of_the_wrong_type_is_one_line_naming_it(case):
    rec, message = WRONG_FIELDS[case]
    with pytest.raises(UserError) as e:
        to_messages(rec, "f.jsonl:3")
    assert str(e.value) == f"f.jsonl:3: {message}"


def test_a_field_name_with_a_line_break_is_shown_escaped_on_one_line():
    with pytest.raises(UserError) as e:
        to_messages({"query\n2": "q", "a": 1}, "f.jsonl:3")
    assert str(e.value) == ("f.jsonl:3: record of no known format (fields: a, query\\n2; "
                            "expected messages, conversations, instruction/output or prompt)")


def test_absent_and_null_optional_fields_are_empty():
    rec = {"instruction": "q", "input": None, "output": "a", "system": None, "history": None, "tools": None}
    assert to_messages(rec, "w") == [user("q"), assistant("a")]
    empty = {**rec, "input": "", "system": "", "history": [], "tools": ""}
    assert to_messages(empty, "w") == [user("q"), assistant("a")]


def test_a_tool_call_may_have_no_content():
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]}
    assert to_messages(rec, "w")[1] == {"role": "assistant", "content": '{"name": "f", "arguments": {}}',
                                        "tool_calls": [CALL]}


@pytest.mark.parametrize("rec,message", [
    ({"prompt": "q", "chosen": [{"role": ["assistant"], "content": "a"}], "rejected": "b"},
     "field 'chosen[1] role' must be a string, got list"),
    ({"prompt": "q", "chosen": "a", "rejected": {"from": {"x": 1}, "value": "b"}},
     "field 'rejected[1] from' must be a string, got dict"),
    ({"question": "q", "response_chosen": ["a"], "response_rejected": "b"},
     "response_chosen[1] must be an object, got str"),
    ({"question": "q", "response_chosen": "a", "response_rejected": 0},
     "field 'response_rejected' must be a string, got int"),
    ({"question": ["q"], "response_chosen": "a", "response_rejected": "b"}, "question[1] must be an object, got str"),
    ({"conversations": [{"from": ["human"], "value": "q"}], "chosen": "a", "rejected": "b"},
     "field 'conversations[1] from' must be a string, got list"),
], ids=["chosen turn role a list", "rejected turn from an object", "response_chosen a list of strings",
        "response_rejected a number", "question a list of strings", "conversations turn from a list"])
def test_a_preference_field_of_the_wrong_type_is_one_line_naming_it(rec, message):
    with pytest.raises(UserError) as e:
        to_pair(rec, "f.jsonl:3")
    assert str(e.value) == f"f.jsonl:3: {message}"


# ---------------------------------------------------------------- --data DIR

def test_a_directory_is_every_data_file_under_it_in_sorted_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    b = write(folder / "b.jsonl", '{"text": "b1"}\n\n{"text": "b3"}\n')
    a = write(folder / "a.txt", "a1\n")
    c = write(folder / "c.json", '[{"text": "c1"}]')
    d = write(folder / "sub" / "d.JSONL", '{"text": "d1"}\n')
    for ignored in ("README.md", "notes.csv", ".hidden.jsonl", "dataset_info.json", ".cache/x.jsonl"):
        write(folder / ignored, "not data {")
    expected = [(f"{a}:1", {"text": "a1"}), (f"{b}:1", {"text": "b1"}), (f"{b}:3", {"text": "b3"}),
                (f"{c}: record 1", {"text": "c1"}), (f"{d}:1", {"text": "d1"})]
    assert read_records(str(folder)) == expected
    assert read_records(str(folder) + "/") == expected


def test_directories_and_files_mix_in_a_comma_list(tmp_path):
    (tmp_path / "dir").mkdir()
    first = write(tmp_path / "first.jsonl", '{"text": "1"}\n')
    inside = write(tmp_path / "dir" / "a.txt", "2\n")
    expected = [(f"{first}:1", {"text": "1"}), (f"{inside}:1", {"text": "2"})]
    assert read_records(f"{first},{tmp_path / 'dir'}") == expected


def test_a_bad_record_in_a_directory_names_its_own_file_and_line(tmp_path):
    write(tmp_path / "a.jsonl", '{"prompt": "ok"}\n')
    bad = write(tmp_path / "b.jsonl", '{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError) as e:
        read_records(str(tmp_path))
    assert str(e.value) == f"{bad}:2: malformed JSON: Expecting value (column 12)"


@pytest.mark.parametrize("files", [[], ["README.md", "train.csv", ".hidden.jsonl"]], ids=["empty", "no data file"])
def test_a_directory_with_no_data_file_is_one_line(tmp_path, files):
    for name in files:
        write(tmp_path / name, "x")
    with pytest.raises(UserError) as e:
        read_records(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: a directory with no .txt, .json or .jsonl file"


def stage_readers(tokenizer):
    """Each stage's own reader of --data (the train_*.py function, its module run without main())."""
    sft, rm, dpo, ppo = (runpy.run_path(os.path.join(ROOT, f"train_{stage}.py"), run_name="readers")
                         for stage in ("sft", "rm", "dpo", "ppo"))
    return {"sft": lambda p: sft["load_dialogues"](tokenizer, p, 512),
            "rm": lambda p: rm["load_pairs"](tokenizer, p, 512),
            "dpo": lambda p: dpo["load_pairs"](tokenizer, p, 512),
            "ppo": lambda p: ppo["load_prompts"](tokenizer, p, 512)}


def test_every_stage_reads_a_directory_as_its_files(tmp_path, tok):
    demo = {"sft": ("sft.jsonl", "sft_alpaca.jsonl"), "rm": ("rm.jsonl", "rm_test.jsonl"),
            "dpo": ("rm.jsonl", "rm_test.jsonl"), "ppo": ("ppo.jsonl", "test.jsonl")}
    for stage, read in stage_readers(tok).items():
        folder = tmp_path / stage
        folder.mkdir()
        demo_subset(folder, {name: 3 for name in demo[stage]})
        files = ",".join(str(folder / name) for name in demo[stage])
        assert len(read(str(folder))) == len(read(files)) == 6, stage


@pytest.mark.slow
def test_train_sft_takes_directories_for_data_and_eval_data(tmp_path, tiny_model_dir):
    train, held_out = tmp_path / "train", tmp_path / "held_out"
    for folder in (train, held_out):
        folder.mkdir()
    demo_subset(train, {"sft.jsonl": 4, "sft_alpaca.jsonl": 3})
    demo_subset(held_out, {"sft.jsonl": 2})
    proc = run_script("train_sft.py", "--model", tiny_model_dir, "--data", train, "--eval_data", held_out,
                      "--output_dir", tmp_path / "out", "--max_steps", 1, "--eval_steps", 1)
    assert "7 dialogues" in proc.stderr
    assert "eval/loss" in read_metrics(tmp_path / "out")[-1]


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
