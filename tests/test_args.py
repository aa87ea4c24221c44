"""The command line (nanorlhf.args): flags from the Args dataclass, config files, one line for a bad flag."""

import dataclasses
import os
import re

import pytest

from nanorlhf.args import BaseArgs, parse_args
from nanorlhf.errors import UserError


# ---------------------------------------------------------------- the command line

@dataclasses.dataclass
class Args(BaseArgs):
    """A stage."""
    block_size: int = dataclasses.field(default=128, metadata={"help": "tokens per block"})
    whiten: bool = dataclasses.field(default=True, metadata={"help": "a switch that is on by default"})


def test_bool_flags_take_a_no_form():
    assert parse_args(Args, []).resume is False
    assert parse_args(Args, ["--resume"]).resume is True
    assert parse_args(Args, ["--resume", "--no-resume"]).resume is False
    assert parse_args(Args, []).whiten is True
    assert parse_args(Args, ["--no-whiten"]).whiten is False


def test_typed_flags_are_parsed_to_their_type():
    args = parse_args(Args, ["--learning_rate", "3e-4", "--block_size", "64", "--data", "a.txt,b.txt"])
    assert (args.learning_rate, args.block_size, args.data) == (3e-4, 64, "a.txt,b.txt")
    assert args.max_steps == -1 and args.finetuning_type == "lora"


def test_bad_finetuning_type_is_a_user_error():
    with pytest.raises(UserError, match=r"^argument --finetuning_type: invalid choice: 'qlora' \(choose from "):
        parse_args(Args, ["--finetuning_type", "qlora"])


def test_an_unknown_flag_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"^unrecognized arguments: --do_train$"):
        parse_args(Args, ["--do_train"])


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: Qwen2.5-0.5B  # LLaMA-Factory's name for --model\nlearning_rate: 1e-4\n"
                    "block_size: 64\nwhiten: false\ncutoff_len: 1024\noverwrite_output_dir: true\n", encoding="utf-8")
    args = parse_args(Args, [str(path), "--block_size", "32"])
    assert (args.model, args.learning_rate, args.block_size, args.whiten, args.max_length, args.overwrite_output_dir) \
        == ("Qwen2.5-0.5B", 1e-4, 32, False, 1024, True)
    json_path = tmp_path / "sft.json"
    json_path.write_text('{"learning_rate": 0.001, "num_train_epochs": 2}', encoding="utf-8")
    from_json = parse_args(Args, [str(json_path)])
    assert (from_json.learning_rate, from_json.num_train_epochs) == (0.001, 2.0)


@pytest.mark.parametrize("text,error", [
    ("do_train: true\n", "{p}: unknown flag 'do_train'"),
    ("block_size: many\n", "{p}: block_size must be int, got 'many'"),
    ("report_to: wandb\n", "{p}: report_to must be one of none, tensorboard, got 'wandb'"),
    ("- a list\n", "{p}: a config file must map flag names to values, got list"),
    ("a: [1\n", "{p}:2: malformed config: "),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, error):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="^" + re.escape(error.format(p=path))):
        parse_args(Args, [str(path)])
    with pytest.raises(UserError, match=r"no such config file"):
        parse_args(Args, [str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("stage", ["pt", "sft", "rm", "ppo"])
def test_every_example_config_is_read_by_its_stage(stage):
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = runpy.run_path(os.path.join(root, f"train_{stage}.py"), run_name="example")  # its Args, not main()
    args = parse_args(script["Args"], [os.path.join(root, "examples", f"{stage}.yaml")])
    assert args.output_dir == f"runs/{stage}"
