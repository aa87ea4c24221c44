"""Flag values: every number a flag takes declares its range, and a value outside it (or NaN, or inf, or a
string not among the choices) stops the script with one line naming the flag, exit status 2, no traceback
and no output dir. The same line for a value from a config file. A value at the edge of a range is taken.

The bad values fail while the flags are parsed, before any model is loaded, so they run as forks of one
process that has imported the scripts once (the `launcher` fixture); the few that need a model
(--lora_target) load a tiny one built here.
"""

import dataclasses
import functools
import math
import os
import re
import runpy

import pytest
from conftest import ROOT, demo_subset, other_tokenizer_model

from nanorlhf.args import SEED_RANGE, check_range, parse_args, parse_range
from nanorlhf.errors import UserError

STAGES = ["pt", "sft", "rm", "ppo", "dpo"]
CHOICE = "argument {flag}: invalid choice: {value!r}"  # argparse's words, up to the list of choices

# (script, flags, the line on stderr after "error: ")
BAD = [
    # the values issue #18 lists
    ("train_sft.py", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0, got 0"),
    ("train_sft.py", ["--lora_rank", "0"], "--lora_rank must be > 0, got 0"),
    ("train_sft.py", ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0, got 0"),
    ("train_ppo.py", ["--num_mini_batches", "0"], "--num_mini_batches must be > 0, got 0"),
    ("train_ppo.py", ["--response_length", "0"], "--response_length must be > 0, got 0"),
    ("train_sft.py", ["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    ("train_pt.py", ["--block_size", "-3"], "--block_size must be > 0, got -3"),
    # a few per stage: negative, zero, nan, inf, out of the choices
    ("train_sft.py", ["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number > 0, got inf"),
    ("train_sft.py", ["--finetuning_type", "qlora"], CHOICE.format(flag="--finetuning_type", value="qlora")),
    ("train_sft.py", ["--lora_alpha", "0"], "--lora_alpha must be > 0, got 0.0"),
    ("train_sft.py", ["--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
    ("train_sft.py", ["--max_steps", "-2"], "--max_steps must be >= -1, got -2"),
    ("train_sft.py", ["--seed", "-1"], f"--seed must be in {SEED_RANGE.replace(',', ', ')}, got -1"),
    ("train_sft.py", ["--logging_steps", "0"], "--logging_steps must be > 0, got 0"),
    ("train_sft.py", ["--eval_steps", "0"], "--eval_steps must be > 0, got 0"),
    ("train_sft.py", ["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1], got 1.5"),
    ("train_sft.py", ["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0, got -1.0"),
    ("train_rm.py", ["--val_size", "1"], "--val_size must be in [0, 1), got 1.0"),
    ("train_rm.py", ["--val_size", "nan"], "--val_size must be a finite number in [0, 1), got nan"),
    ("train_rm.py", ["--save_total_limit", "-1"], "--save_total_limit must be >= 0, got -1"),
    ("train_rm.py", ["--max_length", "0"], "--max_length must be > 0, got 0"),
    ("train_dpo.py", ["--beta", "0"], "--beta must be > 0, got 0.0"),
    ("train_dpo.py", ["--label_smoothing", "0.7"], "--label_smoothing must be in [0, 0.5], got 0.7"),
    ("train_dpo.py", ["--weight_decay", "-0.1"], "--weight_decay must be >= 0, got -0.1"),
    ("train_dpo.py", ["--simpo_beta=-inf"], "--simpo_beta must be a finite number > 0, got -inf"),
    ("train_ppo.py", ["--kl_coef", "-0.05"], "--kl_coef must be >= 0, got -0.05"),
    ("train_ppo.py", ["--kl_coef", "nan"], "--kl_coef must be a finite number >= 0, got nan"),
    ("train_ppo.py", ["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    ("train_ppo.py", ["--top_p", "1.5"], "--top_p must be in [0, 1], got 1.5"),
    ("train_ppo.py", ["--gamma", "1.1"], "--gamma must be in [0, 1], got 1.1"),
    ("train_ppo.py", ["--lam", "-0.1"], "--lam must be in [0, 1], got -0.1"),
    ("train_ppo.py", ["--cliprange", "0"], "--cliprange must be > 0, got 0.0"),
    ("train_ppo.py", ["--kl_horizon", "0"], "--kl_horizon must be > 0, got 0"),
    ("train_ppo.py", ["--ppo_epochs", "0"], "--ppo_epochs must be > 0, got 0"),
    ("train_ppo.py", ["--num_samples_per_prompt", "0"], "--num_samples_per_prompt must be > 0, got 0"),
    ("train_ppo.py", ["--batch_size", "-4"], "--batch_size must be > 0, got -4"),
    ("train_ppo.py", ["--rm_weight", "inf"], "--rm_weight must be a finite number, got inf"),
    ("train_ppo.py", ["--kl_estimator", "k4"], CHOICE.format(flag="--kl_estimator", value="k4")),
    ("train_ppo.py", ["--advantage_estimator", "ppo"], CHOICE.format(flag="--advantage_estimator", value="ppo")),
    # the small command lines beside the stages
    ("nanorlhf/evaluate.py", ["sft=some/dir", "--max_new_tokens", "0"], "--max_new_tokens must be > 0, got 0"),
    ("nanorlhf/evaluate.py", ["sft=some/dir", "--batch_size", "0"], "--batch_size must be > 0, got 0"),
    ("nanorlhf/chat.py", ["--model", "some/dir", "--top_p", "2"], "--top_p must be in [0, 1], got 2.0"),
    ("nanorlhf/chat.py", ["--model", "some/dir", "--max_new_tokens", "0"], "--max_new_tokens must be > 0, got 0"),
    ("nanorlhf/ablate.py", ["--sft", "s", "--rm", "r", "--data", "d", "--jobs", "0"], "--jobs must be > 0, got 0"),
    ("merge_lora.py", ["--base", "b", "--adapter", "a", "--dtype", "fp8"], CHOICE.format(flag="--dtype", value="fp8")),
]

# train_pt.py's own flags, checked by parse_args alone: a fork that runs train_pt.py imports its tokenizer
# trainer, seconds each (the launcher has imported the other stages only)
PT_BAD = [
    (["--vocab_size", "100"], "--vocab_size must be >= 260, got 100"),
    (["--model_size", "huge"], CHOICE.format(flag="--model_size", value="huge")),
    (["--finetuning_type", "qlora"], CHOICE.format(flag="--finetuning_type", value="qlora")),
]

# good values at the edge of each range: (stage, flags, {field: the value parsed})
EDGES = [
    ("ppo", ["--kl_coef", "0", "--target_kl", "0", "--max_steps", "-1", "--save_steps", "0", "--num_updates", "0"],
     {"kl_coef": 0.0, "target_kl": 0.0, "max_steps": -1, "save_steps": 0, "num_updates": 0}),
    ("ppo", ["--gamma", "0", "--lam", "1", "--top_p", "1", "--temperature", "0", "--top_k", "0"],
     {"gamma": 0.0, "lam": 1.0, "top_p": 1.0, "temperature": 0.0, "top_k": 0}),
    ("ppo", ["--cliprange_value", "-1", "--max_grad_norm", "0", "--missing_eos_penalty", "0", "--rm_weight", "-2"],
     {"cliprange_value": -1.0, "max_grad_norm": 0.0, "missing_eos_penalty": 0.0, "rm_weight": -2.0}),
    ("sft", ["--warmup_ratio", "1", "--lora_dropout", "0", "--save_total_limit", "0", "--seed", str(2**32 - 1)],
     {"warmup_ratio": 1.0, "lora_dropout": 0.0, "save_total_limit": 0, "seed": 2**32 - 1}),
    ("rm", ["--val_size", "0", "--seed", "0", "--per_device_train_batch_size", "1"],
     {"val_size": 0.0, "seed": 0, "per_device_train_batch_size": 1}),
    ("dpo", ["--label_smoothing", "0.5", "--simpo_gamma", "0", "--orpo_lambda", "0"],
     {"label_smoothing": 0.5, "simpo_gamma": 0.0, "orpo_lambda": 0.0}),
    ("pt", ["--vocab_size", "260", "--block_size", "1"], {"vocab_size": 260, "block_size": 1}),
]


@functools.cache
def stage_args(stage):
    """A stage script's Args dataclass (the script's imports run, its main does not)."""
    return runpy.run_path(os.path.join(ROOT, f"train_{stage}.py"), run_name="flag_values")["Args"]


def small_parsers():
    """name -> the argparse parser of each command line that is not a stage."""
    from nanorlhf import ablate, chat, evaluate

    return {"evaluate": evaluate.build_parser(), "chat": chat.build_parser(), "ablate": ablate.build_parser()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model (for --lora_target, which needs its layer names) and a few records of the demo data."""
    root = tmp_path_factory.mktemp("flags")
    demo_subset(root, {"sft.jsonl": 4, "ppo.jsonl": 4})
    other_tokenizer_model(root / "model")
    return root


def one_line_and_nothing_written(returncode, stderr, output_dir):
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert returncode == 2
    assert not os.path.exists(output_dir)


# ---------------------------------------------------------------- bad values stop the scripts

# First in the file: the launcher's process imports the scripts while this builds the tiny model.
# sft stands for pt, rm and dpo (all add LoRA in loading.setup_model); PPO adds it in ppo_models.
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_lora_targets_that_match_no_layer_are_one_line(launcher, tiny_dir, tmp_path, stage):
    model = str(tiny_dir / "model")
    flags = ["--sft", model, "--reward_fn", "nanorlhf.rewards:gold"] if stage == "ppo" else ["--model", model]
    output_dir = tmp_path / "out"
    returncode, stderr = launcher.run(f"train_{stage}.py", *flags, "--data", tiny_dir / f"{stage}.jsonl",
                                      "--lora_target", "nonexistent_proj", "--output_dir", output_dir)
    one_line_and_nothing_written(returncode, stderr, output_dir)
    assert stderr == ("error: --lora_target nonexistent_proj matches no nn.Linear layer of LlamaForCausalLM; its "
                      "linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                      "v_proj\n")


@pytest.mark.parametrize("script,flags,expected", BAD, ids=[f"{s} {' '.join(f[-2:])}" for s, f, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_flag(launcher, tmp_path, script, flags, expected):
    output_dir = tmp_path / "out"
    if script != "nanorlhf/chat.py":  # the one without an output dir
        flags = [*flags, "--output_dir", output_dir]
    returncode, stderr = launcher.run(script, *flags)
    one_line_and_nothing_written(returncode, stderr, output_dir)
    assert stderr.startswith(f"error: {expected}")
    if not expected.startswith("argument"):  # our own line is exactly this; argparse's lists the choices after
        assert stderr == f"error: {expected}\n"


def test_a_bad_value_in_a_config_file_is_the_same_line(launcher, tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("kl_coef: -0.05\nbatch_size: 8\n", encoding="utf-8")
    output_dir = tmp_path / "out"
    returncode, stderr = launcher.run("train_ppo.py", config, "--output_dir", output_dir)
    one_line_and_nothing_written(returncode, stderr, output_dir)
    assert stderr == "error: --kl_coef must be >= 0, got -0.05\n"
    config.write_text("gamma: .nan\n", encoding="utf-8")  # YAML's NaN
    returncode, stderr = launcher.run("train_ppo.py", config, "--output_dir", output_dir)
    assert (returncode, stderr) == (2, "error: --gamma must be a finite number in [0, 1], got nan\n")


def test_a_vocabulary_too_small_for_the_data_is_a_user_error():
    from nanorlhf.tiny import train_tokenizer

    with pytest.raises(UserError, match=r"^--vocab_size 260 is too small for this data: its characters, the 256 "
                                        r"bytes and the special tokens need \d+$"):
        train_tokenizer(["a few words, 一些字"], vocab_size=260)


@pytest.mark.parametrize("flags,expected", PT_BAD, ids=[f[0] for f, _ in PT_BAD])
def test_a_bad_value_of_a_pt_flag_is_one_line_naming_it(flags, expected):
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        parse_args(stage_args("pt"), flags)


# ---------------------------------------------------------------- good values are taken

@pytest.mark.parametrize("stage,flags,expected", EDGES, ids=[f"{s} {f[0]}" for s, f, _ in EDGES])
def test_a_value_at_the_edge_of_its_range_is_taken(stage, flags, expected):
    args = parse_args(stage_args(stage), flags)
    assert {name: getattr(args, name) for name in expected} == expected


@pytest.mark.parametrize("spec,inside,outside", [
    (">0", [1e-9, 3], [0, -1]),
    (">=-1", [-1, 0, 10**9], [-2]),
    ("<=1", [1, -5], [1.5]),
    ("[0,1]", [0, 0.5, 1], [-0.1, 1.1]),
    ("(0,1]", [1e-9, 1], [0, 1.1]),
    ("[0, 1)", [0, 0.999], [1]),
    ("any", [-1e30, 0, 1e30], [math.nan, math.inf, -math.inf]),
])
def test_the_range_notation(spec, inside, outside):
    for value in inside:
        check_range("--x", value, spec)
    for value in outside:
        with pytest.raises(UserError, match=r"^--x must be "):
            check_range("--x", value, spec)


def test_a_malformed_range_is_a_programming_error():
    with pytest.raises(ValueError, match="expected >x"):
        parse_range("0..1")


# ---------------------------------------------------------------- every number declares its range

def test_every_numeric_flag_of_every_stage_declares_its_range():
    missing = []
    for stage in STAGES:
        for f in dataclasses.fields(stage_args(stage)):
            if f.type in (int, float, "int", "float"):
                if "range" not in f.metadata:
                    missing.append(f"train_{stage}.py --{f.name}")
                    continue
                parse_range(f.metadata["range"])  # the notation reads
                check_range(f"--{f.name}", f.default, f.metadata["range"])  # the default is inside it
    for name, parser in small_parsers().items():
        missing += [f"{name} {a.option_strings[0]}" for a in parser._actions
                    if a.type in (int, float) and a.range is None]
    assert missing == [], "numeric flags without a declared range"
