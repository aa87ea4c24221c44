"""The scripts as a user runs them: bad input gives exit status 2, one line on stderr that names the
file (and line), no traceback, and no output dir; and the real pipeline PT -> SFT (LoRA) -> merge.

Starting Python and importing torch + transformers is most of what a bad-input run costs (seconds
each, more on a busy 2-core box), and there are two dozen of them. So they run as forks of one
server process that has imported the scripts' modules once: each fork runs the script as
`__main__` with its own argv and its own stderr, as `python script.py ...` would after the imports
(the server checks that the imports themselves print nothing). One test compares a forked run with
a plain subprocess run.
"""

import json
import os
import pickle
import runpy
import shutil
import sys

import pytest
import torch
from conftest import DEMO, ROOT, other_tokenizer_model, run_as_main, run_script
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from nanorlhf.data import encode_dialogue, to_messages
from nanorlhf.lora import load_adapter

BAD_DATA = {  # name: (file name, bytes, stderr after "error: " with {p} for the file's path)
    "empty file": ("d.jsonl", b"", "{p}: file is empty (no records)"),
    "malformed JSON line": ("d.jsonl", b'{"text": "ok"}\n{"text": "bad"\n',
                            "{p}:2: malformed JSON: Expecting ',' delimiter (column 15)"),
    "non-UTF-8 bytes": ("d.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n',
                        "{p}:3: not valid UTF-8 (byte 13 of the line)"),
    "not an object": ("d.jsonl", b'["text", "ok"]\n', "{p}:1: expected a JSON object, got list"),
    "unknown extension": ("d.csv", b"text\nok\n",
                          "{p}: unknown extension '.csv' (expected .txt, .json or .jsonl)"),
}
PT_BAD = {
    "wrong type": ("d.jsonl", b'{"text": "ok"}\n{"text": 5}\n',
                   "{p}:2: a PT record needs a string field 'text'"),
    "missing field": ("d.jsonl", b'{"content": "ok"}\n', "{p}:1: a PT record needs a string field 'text'"),
}
SFT_BAD = {
    "wrong type": ("d.jsonl", b'{"conversations": {"from": "human", "value": "hi"}}\n',
                   "{p}:1: field 'conversations' must be a list of turns, got dict"),
    "unknown role": ("d.jsonl",
                     b'{"conversations": [{"from": "human", "value": "q"}, {"from": "bob", "value": "a"}]}\n',
                     "{p}:1: conversations[2] has unknown role 'bob' "
                     "(expected one of assistant, bot, function_call, gpt, human, observation, system, tool, user)"),
    "missing field": ("d.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n',
                      "{p}:1: missing field 'messages[2] content'"),
    "unknown format": ("d.jsonl", b'{"query": "q", "answer": "a"}\n',
                       "{p}:1: record of no known format (fields: answer, query; "
                       "expected messages, conversations, instruction/output or prompt)"),
    "no answer": ("d.jsonl", b'{"conversations": [{"from": "human", "value": "hi"}]}\n',
                  "{p}:1: an SFT record needs an assistant answer to learn from"),
}
GOOD_SFT = b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n'
MERGE_BAD = ["wrong adapter path", "wrong base path", "base is not a model dir", "malformed adapter config",
             "adapter config missing a field", "adapter without weights", "adapter config not an object",
             "base holds only a pickle"]
PPO_BAD = ["wrong --sft path", "wrong --rm path", "--rm holds only a pickle", "malformed prompt file",
           "prompt of no known format", "no prompt fits --max_length", "different tokenizers",
           "--response_length beyond the model's positions"]
CASE_NAMES = ([f"pt: {name}" for name in {**BAD_DATA, **PT_BAD}] + ["pt: wrong model path"]
              + [f"sft: {name}" for name in {**BAD_DATA, **SFT_BAD}]
              + ["sft: wrong model path", "sft: malformed --eval_data", "sft: model dir holds only a pickle"]
              + [f"merge: {name}" for name in MERGE_BAD]
              + [f"ppo: {name}" for name in PPO_BAD])
PROMPTS = b'{"prompt": "hi"}\n{"prompt": "' + b"a long question " * 20 + b'"}\n'


class Trap:
    """Unpickling this creates a file: proof, if the file never appears, that nothing unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def pickle_only_model(folder, model_dir):
    """A model dir as an old checkpoint or a stranger hands it over: config, tokenizer, pytorch_model.bin."""
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint-*"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(str(folder / "UNPICKLED"))))
    return str(folder)


def reward_model(folder, model_dir):
    """The tiny LM's backbone with a random scalar head."""
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def cases(tmp, model_dir):
    """name -> (script, args, expected stderr line, output dir that must not appear)."""
    out = {}

    def data_file(name, content):
        folder = tmp / name.replace(" ", "_")
        folder.mkdir()
        (folder / content[0]).write_bytes(content[1])
        return str(folder / content[0])

    def add(name, script, args, expected):
        output_dir = str(tmp / ("out-" + name.replace(" ", "_").replace(":", "")))
        out[name] = (script, [*args, "--output_dir", output_dir], expected, output_dir)

    nope = str(tmp / "no-such-dir")
    for stage, bad, good_data in (("pt", {**BAD_DATA, **PT_BAD}, "pt.txt"),
                                  ("sft", {**BAD_DATA, **SFT_BAD}, "sft.jsonl")):
        script, model = f"train_{stage}.py", ([] if stage == "pt" else ["--model", model_dir])
        for name, content in bad.items():
            path = data_file(f"{stage} {name}", content)
            add(f"{stage}: {name}", script, [*model, "--data", path], content[2].format(p=path))
        add(f"{stage}: wrong model path", script, ["--model", nope, "--data", os.path.join(DEMO, good_data)],
            f"{nope}: no such model directory (--model)")
    good = data_file("good sft", ("d.jsonl", GOOD_SFT))
    bad_eval = data_file("bad eval", BAD_DATA["malformed JSON line"])
    add("sft: malformed --eval_data", "train_sft.py",
        ["--model", model_dir, "--data", good, "--eval_data", bad_eval],
        BAD_DATA["malformed JSON line"][2].format(p=bad_eval))
    pickled = pickle_only_model(tmp / "pickle-only", model_dir)
    no_safetensors = f"{pickled}: no .safetensors weights (only safetensors are read, never pickles)"
    add("sft: model dir holds only a pickle", "train_sft.py", ["--model", pickled, "--data", good],
        f"{no_safetensors} (--model)")

    # merge_lora.py checks the adapter's config first, then the base, then the adapter's weights
    config_only, broken = tmp / "adapter-config-only", tmp / "adapter-broken-config"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM", "peft_type": "LORA"}')
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"task_type": \n')
    no_targets = tmp / "adapter-no-target-modules"
    no_targets.mkdir()
    (no_targets / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (no_targets / "adapter_model.safetensors").write_bytes(b"")
    not_object = tmp / "adapter-config-a-list"
    not_object.mkdir()
    (not_object / "adapter_config.json").write_text('["task_type", "CAUSAL_LM"]')
    merges = {  # name: (--base, --adapter, expected)
        "wrong adapter path": (model_dir, nope, f"{nope}: not an adapter directory (no adapter_config.json)"),
        "wrong base path": (nope, config_only, f"{nope}: no such model directory (--base)"),
        "base is not a model dir": (config_only, config_only,
                                    f"{config_only}: not a model directory (no config.json) (--base)"),
        "malformed adapter config": (model_dir, broken, f"{broken}/adapter_config.json: malformed JSON: "
                                                        "Expecting value (line 2)"),
        "adapter config missing a field": (model_dir, no_targets, f"{no_targets}/adapter_config.json: "
                                                                  "missing field 'target_modules'"),
        "adapter without weights": (model_dir, config_only, f"{config_only}: not a LoRA adapter dir, "
                                                            "adapter_model.safetensors is missing"),
        "adapter config not an object": (model_dir, not_object, f"{not_object}/adapter_config.json: "
                                                                "expected a JSON object, got list"),
        "base holds only a pickle": (pickled, config_only, f"{no_safetensors} (--base)"),
    }
    assert list(merges) == MERGE_BAD
    for name, (base, adapter, expected) in merges.items():
        add(f"merge: {name}", "merge_lora.py", ["--base", str(base), "--adapter", str(adapter)], expected)

    # train_ppo.py checks both model dirs, then the tokenizers, then the prompts, then the lengths
    rm, other = reward_model(tmp / "rm", model_dir), other_tokenizer_model(tmp / "other-tokenizer")
    prompts = data_file("ppo prompts", ("p.jsonl", PROMPTS))
    bad_prompts = data_file("ppo malformed", BAD_DATA["malformed JSON line"])
    unknown = data_file("ppo unknown", ("p.jsonl", b'{"prompt": "hi"}\n{"query": "hi"}\n'))
    ours, theirs = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(other)
    first = next(i for i in range(len(theirs))  # the first id the two tokenizers disagree on
                 if ours.convert_ids_to_tokens(i) != theirs.convert_ids_to_tokens(i))
    ours_first, theirs_first = ours.convert_ids_to_tokens(first), theirs.convert_ids_to_tokens(first)
    ppo = {  # name: (--sft, --rm, --data, more flags, expected)
        "wrong --sft path": (nope, rm, prompts, [], f"{nope}: no such model directory (--sft)"),
        "wrong --rm path": (model_dir, nope, prompts, [], f"{nope}: no such model directory (--rm)"),
        "--rm holds only a pickle": (model_dir, pickled, prompts, [], f"{no_safetensors} (--rm)"),
        "malformed prompt file": (model_dir, rm, bad_prompts, [],
                                  BAD_DATA["malformed JSON line"][2].format(p=bad_prompts)),
        "prompt of no known format": (
            model_dir, rm, unknown, [], f"{unknown}:2: record of no known format (fields: query; "
                                        "expected messages, conversations, instruction/output or prompt)"),
        "no prompt fits --max_length": (
            model_dir, rm, prompts, ["--max_length", "4"],
            f"{prompts}:1: no prompt fits in --max_length 4 tokens (all 2 are longer)"),
        "different tokenizers": (
            model_dir, other, prompts, [],
            f"--sft {model_dir} and --rm {other} have different tokenizers "
            f"({len(ours)} vs {len(theirs)} tokens; id {first} is {ours_first!r} vs {theirs_first!r}): "
            "train the reward model from the SFT model, or pass --rm_tokenizer_mismatch retokenize"),
        "--response_length beyond the model's positions": (
            model_dir, rm, prompts, ["--response_length", "1000"],
            f"--max_length 256 + --response_length 1000 exceeds the model's 512 positions ({model_dir})"),
    }
    assert list(ppo) == PPO_BAD
    for name, (sft, reward, data, flags, expected) in ppo.items():
        add(f"ppo: {name}", "train_ppo.py", ["--sft", sft, "--rm", reward, "--data", data, *flags], expected)
    return out


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def case_table(tmp_module, tiny_model_dir):
    return cases(tmp_module, tiny_model_dir)


@pytest.fixture(scope="module")
def truncation_run(tmp_module, tiny_model_dir):
    """train_sft.py on four dialogues: two fit, one is cut but keeps answer tokens, one loses them all."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    cut = {"conversations": [{"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "a long answer " * 20}]}
    lost = {"conversations": [{"from": "human", "value": "a long question " * 20},
                              {"from": "gpt", "value": "ok"}]}
    max_length = 24
    lengths = [len(encode_dialogue(tokenizer, to_messages(r, "w"))[0]) for r in (short, cut, lost)]
    assert lengths[0] <= max_length < min(lengths[1:])  # the premise: two of the three are too long
    path = tmp_module / "truncate.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (short, cut, lost, short)) + "\n")
    args = ["--model", tiny_model_dir, "--data", str(path), "--output_dir", str(tmp_module / "out-truncate"),
            "--max_steps", "1", "--max_length", str(max_length)]
    return "train_sft.py", args


@pytest.fixture(scope="module")
def dropping_runs(tmp_module, case_table, tiny_model_dir):
    """train_ppo.py with one prompt of two too long for --max_length; train_rm.py with only pairs that
    prefer nothing (chosen == rejected)."""
    prompts = tmp_module / "some-too-long.jsonl"
    prompts.write_bytes(PROMPTS)
    rm = case_table["ppo: wrong --sft path"][1][3]  # the tiny reward model the PPO cases use
    same = tmp_module / "same.jsonl"
    same.write_text('{"prompt": "hi", "chosen": "ok", "rejected": "ok"}\n' * 2)
    small = ["--num_updates", "1", "--batch_size", "2", "--response_length", "4", "--ppo_epochs", "1",
             "--num_mini_batches", "1"]
    return {"ppo: some prompts too long": ("train_ppo.py", [
                "--sft", tiny_model_dir, "--rm", rm, "--data", str(prompts), "--max_length", "32", *small,
                "--output_dir", str(tmp_module / "out-ppo-some-too-long")]),
            "rm: every pair prefers nothing": ("train_rm.py", [
                "--model", tiny_model_dir, "--data", str(same),
                "--output_dir", str(tmp_module / "out-rm-same")])}


@pytest.fixture(scope="module")
def runs(case_table, truncation_run, dropping_runs, tmp_module):
    """name -> (exit status, stderr) of every bad-input run, and of the truncation and dropping runs."""
    invocations = {name: (script, args) for name, (script, args, _, _) in case_table.items()}
    invocations["sft: truncation"] = truncation_run
    invocations.update(dropping_runs)
    spec = tmp_module / "invocations.json"
    spec.write_text(json.dumps(invocations))
    server = run_script(os.path.relpath(__file__, ROOT), "--serve", spec)
    assert server.stderr == ""  # the imports done once for all runs print nothing
    results = json.loads(spec.with_suffix(".results").read_text())
    return {name: tuple(result) for name, result in results.items()}


def serve(spec):
    """Import each script's modules once, then run every invocation in a fresh fork of this process."""
    invocations = json.loads(open(spec, encoding="utf-8").read())
    for script in sorted({script for script, _ in invocations.values()}):
        runpy.run_path(os.path.join(ROOT, script), run_name="imports_only")  # its imports, not main()
    # One thread: two per tiny run only spin against each other on a busy 2-core box (10x slower).
    torch.set_num_threads(1)
    results = {}
    for i, (name, (script, args)) in enumerate(invocations.items()):
        stderr_path = f"{spec}.{i}.stderr"
        pid = os.fork()
        if pid == 0:
            run_as_main(script, args, stderr_path)
        _, status = os.waitpid(pid, 0)
        results[name] = (os.waitstatus_to_exitcode(status), open(stderr_path, encoding="utf-8").read())
    with open(spec[:-len(".json")] + ".results", "w", encoding="utf-8") as f:
        json.dump(results, f)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, runs, case_table):
    _, _, expected, output_dir = case_table[name]
    returncode, stderr = runs[name]
    assert "Traceback" not in stderr
    assert stderr == f"error: {expected}\n"
    assert returncode == 2
    assert not os.path.exists(output_dir)


def test_every_case_is_checked(case_table):
    assert sorted(case_table) == sorted(CASE_NAMES)


def test_a_forked_run_is_what_a_plain_subprocess_gives(runs, case_table):
    script, args, _, _ = case_table["sft: malformed JSON line"]
    proc = run_script(script, *args, check=False)
    assert (proc.returncode, proc.stderr) == runs["sft: malformed JSON line"]


# ---------------------------------------------------------------- truncation warning

def test_sft_counts_truncated_and_dropped_dialogues(runs):
    returncode, stderr = runs["sft: truncation"]
    assert returncode == 0, stderr
    assert ("warning: 2 dialogues longer than --max_length 24 were truncated "
            "(1 of them dropped: no answer token left)") in stderr.splitlines()
    assert "3 dialogues;" in stderr  # the one with no answer token left is not trained on


def test_no_model_dir_pickle_was_ever_unpickled(runs, case_table):
    pickled = case_table["sft: model dir holds only a pickle"][1][1]
    assert os.path.exists(os.path.join(pickled, "pytorch_model.bin"))
    assert not os.path.exists(os.path.join(pickled, "UNPICKLED"))


def test_ppo_skips_prompts_longer_than_max_length_with_one_warning(runs, dropping_runs):
    returncode, stderr = runs["ppo: some prompts too long"]
    assert returncode == 0, stderr
    prompts = dropping_runs["ppo: some prompts too long"][1][5]
    assert (f"warning: skipped 1 prompts longer than --max_length 32 tokens (first at {prompts}:2)"
            in stderr.splitlines())
    assert "1 prompts;" in stderr


def test_rm_with_only_pairs_that_prefer_nothing_warns_then_fails(runs, dropping_runs):
    returncode, stderr = runs["rm: every pair prefers nothing"]
    args = dropping_runs["rm: every pair prefers nothing"][1]
    data, output_dir = args[3], args[5]
    assert stderr.splitlines() == [
        f"warning: 2 pairs with chosen == rejected were dropped, they prefer nothing (first at {data}:1)",
        f"error: {data}: no usable preference pair"]
    assert returncode == 2
    assert not os.path.exists(output_dir)


# ---------------------------------------------------------------- the real pipeline

@pytest.mark.slow
def test_pt_then_lora_sft_then_merge_gives_the_logits_of_base_plus_adapter(tiny_model_dir, tmp_path):
    # PT: tiny_model_dir is train_pt.py's output (--max_steps 8 on the demo corpus, see conftest)
    pt_metrics = [json.loads(line) for line in open(os.path.join(tiny_model_dir, "metrics.jsonl"))]
    assert pt_metrics[-1]["step"] == 8 and {"loss", "lr"} <= set(pt_metrics[-1])

    sft, merged, data = tmp_path / "sft", tmp_path / "merged", tmp_path / "sft.jsonl"
    with open(os.path.join(DEMO, "sft.jsonl"), encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    # a high learning rate, so that the adapter moves the logits far beyond the tolerance below
    run_script("train_sft.py", "--model", tiny_model_dir, "--data", data, "--output_dir", sft,
               "--max_steps", 5, "--save_steps", 2, "--logging_steps", 1, "--per_device_train_batch_size", 4,
               "--max_length", 64, "--lora_rank", 4, "--learning_rate", 1e-2)
    checkpoints = sorted(n for n in os.listdir(sft) if n.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        assert {"trainer_state.pt", "adapter_config.json", "adapter_model.safetensors"} <= \
            set(os.listdir(sft / name))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(sft))
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr"} <= set(r) for r in rows)

    run_script("merge_lora.py", "--base", tiny_model_dir, "--adapter", sft, "--output_dir", merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = "<|im_start|>user\n我头疼，还发烧。<|im_end|>\n<|im_start|>assistant\n"
    x = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        base_logits = base(x).logits
        adapted_logits = load_adapter(base, str(sft))(x).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-4)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
