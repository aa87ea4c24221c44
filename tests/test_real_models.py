"""The models users bring: their tokenizer configurations and architectures, through every stage.

tests/real_models.py builds tiny random models whose tokenizers reproduce real ones (special
tokens, bos/eos/pad, chat template, generation_config eos ids). What must hold for every one:
SFT labels end at the end-of-turn token the chat template writes; the pad is distinct from it and
from EOS; the rollout stops at it and at every generation_config eos id; a merged reward model
scores in transformers as in nanorlhf; PEFT loads every adapter; SFT -> merge -> RM -> merge ->
PPO -> chat runs end to end.
"""

import functools
import itertools
import json
import os
import re

import pytest
import torch
from conftest import DEMO
from real_models import CONFIGS, build, train_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from nanorlhf.data import IGNORE, encode_answer, encode_dialogue, encode_prompt, to_messages
from nanorlhf.rm import score
from nanorlhf.sampling import generate
from nanorlhf.template import end_of_turn, prepare_tokenizer, render, stop_ids

# name: (end of turn, pad after prepare_tokenizer, what prepare_tokenizer said)
EXPECTED = {
    "qwen2.5-base": ("<|im_end|>", "<|vision_pad|>", "pads with '<|endoftext|>', which is its EOS"),
    "qwen2.5-instruct": ("<|im_end|>", "<|endoftext|>", None),
    "qwen3": ("<|im_end|>", "<|endoftext|>", None),
    "llama3-instruct": ("<|eot_id|>", "<|reserved_special_token_0|>", "pads with '<|end_of_text|>', which is its EOS"),
    "llama3.1-no-pad": ("<|eot_id|>", "<|finetune_right_pad_id|>", "has no pad token"),
    "gemma2": ("<end_of_turn>", "<pad>", None),
    "phi3": ("<|end|>", "<unk>", "pads with '<|endoftext|>', which is its EOS"),
    "mistral": ("</s>", "<unk>", "has no pad token"),
    "tinyllama": ("</s>", "<unk>", "no chat template"),
    "gpt2-like": ("<|endoftext|>", "<pad>", "added <pad>"),
}
# every stage on one configuration of most model classes (the token tests above take them all): qwen2.5-instruct is
# qwen2.5-base's class and template; tinyllama and mistral run Llama's layers (llama3-instruct) with no template
# (as gpt2-like) and with no pad token (as phi3)
PIPELINE = ["qwen2.5-base", "qwen3", "llama3-instruct", "gemma2", "phi3", "gpt2-like"]
ANSWER = "Rest and drink plenty of fluids."
DIALOGUE = {"conversations": [{"from": "human", "value": "I have a cough."}, {"from": "gpt", "value": "Since when?"},
                              {"from": "human", "value": "Two days."}, {"from": "gpt", "value": ANSWER}]}
WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Beijing"}}'
TOOL_DIALOGUE = {"conversations": [{"from": "human", "value": "Weather in Beijing?"},
                                   {"from": "function_call", "value": CALL},
                                   {"from": "observation", "value": "sunny, 25 C"},
                                   {"from": "gpt", "value": "It is sunny."}], "tools": json.dumps([WEATHER])}


@functools.lru_cache(maxsize=None)
def prepared(name):
    tokenizer = train_tokenizer(CONFIGS[name])
    return tokenizer, prepare_tokenizer(tokenizer, name)


def labelled_runs(tokenizer, ids, labels):
    """The token runs that carry labels, each as a list of ids."""
    return [[i for i, _ in run] for labelled, run in itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE)
            if labelled]


# ---------------------------------------------------------------- tokens: end of turn, pad, template

@pytest.mark.parametrize("name", list(EXPECTED))
def test_end_of_turn_and_pad_of_each_configuration(name):
    tokenizer, said = prepared(name)
    eot, pad, why = EXPECTED[name]
    assert end_of_turn(tokenizer)[0] == eot
    assert tokenizer.pad_token == pad
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, end_of_turn(tokenizer)[1])
    if why is None:
        assert said == []
    else:
        assert any(why in line for line in said), said
        assert all(line.startswith(f"{name}: ") for line in said)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sft_labels_end_at_the_end_of_turn_token_and_nothing_after_it_is_labelled(name):
    tokenizer, _ = prepared(name)
    eot_id = end_of_turn(tokenizer)[1]
    ids, labels = encode_dialogue(tokenizer, to_messages(DIALOGUE, "d"))
    runs = labelled_runs(tokenizer, ids, labels)
    assert len(runs) == 2
    for run, answer in zip(runs, ["Since when?", ANSWER]):
        assert run[-1] == eot_id and run.count(eot_id) == 1
        assert tokenizer.decode(run[:-1]).strip().endswith(answer)
    assert ids[-1] == eot_id  # what the template writes after the last answer is dropped
    # the context of every answer is exactly the prompt the policy is given at generation time
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert ids[:first_answer] == encode_prompt(tokenizer, to_messages(DIALOGUE, "d")[:1])
    second = len(ids) - len(runs[1])
    assert ids[:second] == encode_prompt(tokenizer, to_messages(DIALOGUE, "d")[:3])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_special_looking_string_in_a_rendered_chat_is_one_token(name):
    tokenizer, _ = prepared(name)
    text = render(tokenizer, to_messages(DIALOGUE, "d"), add_generation_prompt=False)
    for marker in set(re.findall(r"<[|/]?[a-z_|]+[|]?>", text)):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1, (marker, text)


@pytest.mark.parametrize("name", ["tinyllama", "gpt2-like"])
def test_no_template_falls_back_to_a_plain_format_with_the_tokenizers_own_eos(name):
    tokenizer, said = prepared(name)
    assert any("no chat template; using the plain User:/Assistant: format" in line for line in said)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bos = tokenizer.bos_token or ""
    assert render(tokenizer, messages) == f"{bos}User: Hi\nAssistant: Hello{tokenizer.eos_token}\n"
    assert render(tokenizer, messages[:1], add_generation_prompt=True) == f"{bos}User: Hi\nAssistant:"


def test_a_template_that_refuses_a_system_turn_gets_it_at_the_start_of_the_first_user_message():
    tokenizer, _ = prepared("gemma2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages, add_generation_prompt=True) == \
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_the_reward_model_reads_prompt_answer_and_end_of_turn():
    tokenizer, _ = prepared("qwen2.5-base")
    messages = [{"role": "user", "content": "I have a cough."}]
    ids = encode_answer(tokenizer, messages, ANSWER)
    prompt = encode_prompt(tokenizer, messages)
    assert ids[:len(prompt)] == prompt
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids[len(prompt):]) == ANSWER + "<|im_end|>"


def test_stop_ids_are_the_end_of_turn_eos_and_generation_config_ids():
    tokenizer, _ = prepared("llama3-instruct")
    model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [5, 6]})()})()
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    assert stop_ids(tokenizer, model) == sorted(ids | {5, 6})
    assert stop_ids(tokenizer) == sorted(ids)


# ---------------------------------------------------------------- tool calls

def segments(tokenizer, rec):
    ids, labels = encode_dialogue(tokenizer, to_messages(rec, "d"))
    return [(labelled, tokenizer.decode([i for i, _ in run]))
            for labelled, run in itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE)]


def test_tool_calls_in_a_template_that_knows_tools_label_the_call_not_the_observation():
    tokenizer, _ = prepared("qwen2.5-instruct")
    tools = json.dumps({"type": "function", "function": WEATHER})
    system = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
              "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
              f"signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, "
              "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
              '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
    assert segments(tokenizer, TOOL_DIALOGUE) == [
        (False, system + "<|im_start|>user\nWeather in Beijing?<|im_end|>\n<|im_start|>assistant\n"),
        (True, f"<tool_call>\n{CALL}\n</tool_call><|im_end|>"),
        (False, "\n<|im_start|>user\n<tool_response>\nsunny, 25 C\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "It is sunny.<|im_end|>"),
    ]


def test_tool_calls_in_a_template_without_tools_use_the_plain_form():
    tokenizer, _ = prepared("llama3-instruct")
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    listing = ('You can call these tools; to call one, answer with {"name": ..., "arguments": {...}}:\n'
               + json.dumps(WEATHER) + "\n\n")
    assert segments(tokenizer, TOOL_DIALOGUE) == [
        (False, "<|begin_of_text|>" + head.format("user") + listing + "Weather in Beijing?<|eot_id|>"
         + head.format("assistant")),
        (True, CALL + "<|eot_id|>"),
        (False, head.format("user") + "Observation: sunny, 25 C<|eot_id|>" + head.format("assistant")),
        (True, "It is sunny.<|eot_id|>"),
    ]


def test_openai_tool_calls_and_tool_role_read_like_sharegpt_function_call_and_observation():
    tokenizer, _ = prepared("qwen2.5-instruct")
    rec = {"messages": [{"role": "user", "content": "Weather in Beijing?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Beijing"}'}}]},
                        {"role": "tool", "content": "sunny, 25 C"}, {"role": "assistant", "content": "It is sunny."}],
           "tools": [{"type": "function", "function": WEATHER}]}
    assert segments(tokenizer, rec) == segments(tokenizer, TOOL_DIALOGUE)


def test_a_prompt_may_end_with_a_tool_result():
    from nanorlhf.data import prompt_messages

    rec = {**TOOL_DIALOGUE, "conversations": TOOL_DIALOGUE["conversations"][:3]}
    assert prompt_messages(rec, "d")[-1] == {"role": "tool", "content": "sunny, 25 C"}


@pytest.mark.parametrize("value,error", [
    ("not json", "d: field 'conversations[2]' is not valid JSON"),
    ('{"arguments": {}}', "d: conversations[2] must be a tool call"),
])
def test_a_bad_tool_call_is_one_clear_line(value, error):
    from nanorlhf.errors import UserError

    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}
    with pytest.raises(UserError, match="^" + re.escape(error)):
        to_messages(rec, "d")


# ---------------------------------------------------------------- each architecture, every stage

def write_data(folder):
    """Small SFT (with a multi-turn and a tool-call dialogue), preference and prompt files."""
    def lines(name, n):
        with open(os.path.join(DEMO, name), encoding="utf-8") as f:
            return f.read().splitlines()[:n]

    paths = {"sft": folder / "sft.jsonl", "rm": folder / "rm.jsonl", "ppo": folder / "ppo.jsonl"}
    paths["sft"].write_text("\n".join(lines("sft.jsonl", 14) + [json.dumps(DIALOGUE), json.dumps(TOOL_DIALOGUE)])
                            + "\n", encoding="utf-8")
    paths["rm"].write_text("\n".join(lines("rm.jsonl", 16)) + "\n", encoding="utf-8")
    paths["ppo"].write_text("\n".join(lines("ppo.jsonl", 8)) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module", params=PIPELINE)
def pipeline(request, launcher, tmp_path_factory):
    """SFT (LoRA) -> merge -> RM (LoRA) -> merge -> PPO (2 iterations) -> chat, on configuration `name`."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    data = write_data(root)
    d = {k: str(root / k) for k in ("base", "sft", "sft-merged", "rm", "rm-merged", "ppo")}
    build(name, d["base"])
    steps = [
        ("train_sft.py", "--model", d["base"], "--data", data["sft"], "--output_dir", d["sft"], "--max_steps", 2,
         "--per_device_train_batch_size", 4, "--lora_rank", 4, "--max_length", 400),
        ("merge_lora.py", "--base", d["base"], "--adapter", d["sft"], "--output_dir", d["sft-merged"]),
        ("train_rm.py", "--model", d["sft-merged"], "--data", data["rm"], "--output_dir", d["rm"], "--max_steps", 2,
         "--per_device_train_batch_size", 4, "--lora_rank", 4, "--val_size", 0),
        ("merge_lora.py", "--base", d["sft-merged"], "--adapter", d["rm"], "--output_dir", d["rm-merged"]),
        ("train_ppo.py", "--sft", d["sft-merged"], "--rm", d["rm-merged"], "--data", data["ppo"], "--output_dir",
         d["ppo"], "--num_updates", 2, "--batch_size", 4, "--response_length", 6, "--ppo_epochs", 1,
         "--num_mini_batches", 1, "--lora_rank", 4, "--logging_steps", 1, "--max_length", 400),
        ("nanorlhf/chat.py", "--model", d["ppo"], "--prompt", "I have a cough.", "--max_new_tokens", 6, "--seed", 0),
    ]
    d["stderr"] = {}
    for script, *args in steps:
        status, stderr = launcher.run(script, *args)
        assert status == 0, f"{name}: {script} failed:\n{stderr[-3000:]}"
        d["stderr"][script] = stderr
    return name, d


@pytest.mark.slow
def test_pipeline_saves_the_chosen_pad_and_stop_ids_with_the_models(pipeline):
    name, d = pipeline
    eot, pad, _ = EXPECTED[name]
    for folder in ("sft", "sft-merged", "rm", "rm-merged", "ppo"):
        assert AutoTokenizer.from_pretrained(d[folder]).pad_token == pad, folder
    tokenizer = AutoTokenizer.from_pretrained(d["sft-merged"])
    model = AutoModelForCausalLM.from_pretrained(d["sft-merged"])
    assert tokenizer.convert_tokens_to_ids(eot) in model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    said = next(line for line in d["stderr"]["train_ppo.py"].splitlines() if line.startswith("responses end at"))
    assert repr(eot) in said
    with open(os.path.join(d["ppo"], "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


@pytest.mark.slow
def test_peft_loads_every_adapter_of_the_pipeline(pipeline):
    from peft import PeftModel

    _, d = pipeline
    tokenizer = AutoTokenizer.from_pretrained(d["sft-merged"])
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "I have a cough."}])])
    with torch.no_grad():
        for base, adapter, merged in (("base", "sft", "sft-merged"), ("sft-merged", "ppo", None)):
            model = AutoModelForCausalLM.from_pretrained(d[base])
            rows = model.get_input_embeddings().weight.size(0)
            if len(tokenizer) > rows:  # an added <pad>: the base grows first, as the README says
                model.resize_token_embeddings(len(tokenizer))
            logits = PeftModel.from_pretrained(model, d[adapter]).eval()(input_ids=ids).logits
            if merged:  # the same logits (but the new pad row's, whatever its initialisation)
                expected = AutoModelForCausalLM.from_pretrained(d[merged]).eval()(input_ids=ids).logits
                assert torch.allclose(logits[..., :rows], expected[..., :rows], atol=1e-4)
            assert torch.isfinite(logits).all()
        rm_base = AutoModelForSequenceClassification.from_pretrained(d["sft-merged"], num_labels=1)
        rm_base.config.pad_token_id = tokenizer.pad_token_id
        peft_rm = PeftModel.from_pretrained(rm_base, d["rm"]).eval()
        merged_rm = AutoModelForSequenceClassification.from_pretrained(d["rm-merged"]).eval()
        assert torch.allclose(peft_rm(input_ids=ids).logits, merged_rm(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_merged_reward_model_scores_in_transformers_as_in_nanorlhf(pipeline):
    _, d = pipeline
    tokenizer = AutoTokenizer.from_pretrained(d["rm-merged"])
    model = AutoModelForSequenceClassification.from_pretrained(d["rm-merged"]).eval()
    messages = [{"role": "user", "content": "I have a cough."}]
    sequences = [encode_answer(tokenizer, messages, a) for a in (ANSWER, "Rest.", "See a doctor if it hurts.")]
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        ours = score(model, input_ids, attention_mask)
        theirs = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_rollout_stops_at_the_end_of_turn_and_at_every_generation_config_eos(pipeline):
    _, d = pipeline
    tokenizer = AutoTokenizer.from_pretrained(d["sft-merged"])
    prepare_tokenizer(tokenizer, d["sft-merged"])
    model = AutoModelForCausalLM.from_pretrained(d["sft-merged"]).eval()
    stops = stop_ids(tokenizer, model)
    assert end_of_turn(tokenizer)[1] in stops
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("I have a cough.", "Hi")]
    for stop in stops:
        steps = {"n": 0}

        def rig(module, inputs, output):  # no stop token before the third; the third is `stop` in every row
            steps["n"] += 1
            output[..., stops] = -1e4
            if steps["n"] == 3:
                output[..., stop] = 1e4
            return output

        handle = model.get_output_embeddings().register_forward_hook(rig)
        try:
            batch = generate(model, prompts, 10, stops, tokenizer.pad_token_id, temperature=1.0)
        finally:
            handle.remove()
        assert batch["response"].shape[1] == 3  # stopped as soon as every row had ended
        assert batch["response"][:, 2].tolist() == [stop, stop]
        assert batch["response_mask"].tolist() == [[1.0] * 3] * 2
