"""Flags, config files, device and seed: what every stage does before it loads anything.

Each stage declares its flags once, as a dataclass of fields with a help text (cleanrl's `Args`);
`parse_args` turns it into a command line, reads an optional YAML/JSON config file first, and
reports a bad flag as one line (exit 2).

Every number a flag takes declares the values it allows, in its metadata: "range": ">0", ">=0", "[0,1]",
"(0,1]", ... or "any" (see `parse_range`). Every float must also be finite. The values are checked once,
after the config file and the command line are merged, so a bad one never reaches the code that uses it:
`--lora_rank must be > 0, got 0`.
"""

import argparse
import dataclasses
import math
import operator
import os
import random
import sys

import numpy as np
import torch

from nanorlhf import distributed as dist
from nanorlhf.errors import UserError

SEED_RANGE = f"[0,{2**32 - 1}]"  # what numpy's seed accepts


@dataclasses.dataclass
class BaseArgs:
    """Flags every stage shares (names as in LLaMA-Factory / transformers' TrainingArguments)."""
    model: str = dataclasses.field(default="", metadata={"help": "model directory (transformers format) or .gguf file",
                                                         "aliases": ["model_name_or_path"]})
    data: str = dataclasses.field(default="", metadata={
        "help": "data files or directories of them, comma-separated: .txt .json .jsonl"})
    eval_data: str = dataclasses.field(default="", metadata={"help": "held-out data files or directories"})
    output_dir: str = dataclasses.field(default="", metadata={"help": "where the model, checkpoints, metrics go"})
    overwrite_output_dir: bool = dataclasses.field(default=False, metadata={
        "help": "delete an earlier run in --output_dir first (otherwise a run there is refused)"})
    max_steps: int = dataclasses.field(default=-1, metadata={
        "help": "optimizer steps (overrides epochs if > 0; -1 = off)", "range": ">=-1"})
    num_train_epochs: float = dataclasses.field(default=1.0, metadata={"help": "passes over the data", "range": ">0"})
    per_device_train_batch_size: int = dataclasses.field(default=8, metadata={
        "help": "sequences per micro-batch", "range": ">0"})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={
        "help": "micro-batches per step", "range": ">0"})
    learning_rate: float = dataclasses.field(default=2e-4, metadata={"help": "peak learning rate", "range": ">=0"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay", "range": ">=0"})
    warmup_ratio: float = dataclasses.field(default=0.03, metadata={
        "help": "linear warmup fraction of steps", "range": "[0,1]"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={
        "help": "gradient clipping (0 = off)", "range": ">=0"})
    finetuning_type: str = dataclasses.field(default="lora", metadata={"help": "lora | full",
                                                                         "choices": ["lora", "full"]})
    lora_rank: int = dataclasses.field(default=8, metadata={"help": "LoRA rank r", "range": ">0"})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={
        "help": "LoRA alpha (scaling alpha/r)", "range": ">0"})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "dropout on the LoRA input", "range": "[0,1)"})
    lora_target: str = dataclasses.field(default="all", metadata={"help": "module names, comma-separated, or all"})
    max_length: int = dataclasses.field(default=512, metadata={"help": "longest sequence in tokens",
                                                               "aliases": ["cutoff_len"], "range": ">0"})
    seed: int = dataclasses.field(default=42, metadata={"help": "random seed", "range": SEED_RANGE})
    logging_steps: int = dataclasses.field(default=10, metadata={"help": "log every N steps", "range": ">0"})
    save_steps: int = dataclasses.field(default=0, metadata={
        "help": "checkpoint every N steps (0 = end only)", "range": ">=0"})
    save_total_limit: int = dataclasses.field(default=2, metadata={
        "help": "checkpoints kept (0 = all)", "range": ">=0"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = dataclasses.field(default="auto", metadata={
        "help": "weights: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16; with LoRA only the frozen base "
                "takes it, adapters and heads stay fp32", "choices": ["auto", "fp32", "bf16", "fp16", "float32",
                                                                       "bfloat16", "float16"]})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": "allow a model's own code"})
    report_to: str = dataclasses.field(default="none", metadata={
        "help": "also log to: none | tensorboard (output_dir/tensorboard)", "choices": ["none", "tensorboard"]})


def parse_range(spec):
    """A flag's allowed values, as written in its declaration -> (test, words): one side ">0" ">=0" "<1"
    "<=1", both sides "[0,1]" "(0,1]" "[0,1)" "(0,1)" (a square bracket includes the end), or "any"."""
    s = spec.replace(" ", "")
    if s == "any":
        return (lambda x: True), ""
    for op, compare in ((">=", operator.ge), ("<=", operator.le), (">", operator.gt), ("<", operator.lt)):
        if s.startswith(op):
            bound = s[len(op):]
            return (lambda x: compare(x, float(bound))), f"{op} {bound}"
    if s[:1] in ("[", "(") and s[-1:] in ("]", ")") and s.count(",") == 1:
        low, high = s[1:-1].split(",")
        above = operator.ge if s[0] == "[" else operator.gt
        below = operator.le if s[-1] == "]" else operator.lt
        return (lambda x: above(x, float(low)) and below(x, float(high))), f"in {s[0]}{low}, {high}{s[-1]}"
    raise ValueError(f"range {spec!r}: expected >x, >=x, <x, <=x, [a,b], (a,b], [a,b), (a,b) or any")


def check_range(flag, value, spec):
    """Refuse a number outside its range (or a NaN or infinite float) with one line naming the flag."""
    inside, words = parse_range(spec)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number{' ' + words if words else ''}, got {value}")
    if not inside(value):
        raise UserError(f"{flag} must be {words}, got {value}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (exit 2 via UserError) instead of usage + message, and a
    number is checked against the range it declares: add_argument("--top_p", type=float, range="[0,1]")."""

    def error(self, message):
        raise UserError(message)

    def add_argument(self, *flags, range=None, **kwargs):
        action = super().add_argument(*flags, **kwargs)
        action.range = range  # None: not declared, any finite number (tests/test_flag_values.py wants one)
        return action

    def parse_args(self, args=None, namespace=None):
        """argparse's, then every number's range, on the final values (a config file's included)."""
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if action.option_strings and isinstance(value, (int, float)) and not isinstance(value, bool):
                check_range(action.option_strings[0], value, action.range or "any")
        return parsed


def _flag_type(f):
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type) if isinstance(f.type, str) \
        else f.type


def read_config(path, cls):
    """A YAML or JSON file of flags ({"learning_rate": 1e-4, ...}) -> {field name: value}, checked
    the way the command line checks them (types and choices here; ranges once the command line is merged
    in, by ArgumentParser.parse_args). Aliases (metadata "aliases") are accepted as keys."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)  # JSON is YAML too
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: malformed config: {getattr(e, 'problem', None) or e}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config file must map flag names to values, got {type(config).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = {alias: name for name, f in fields.items() for alias in f.metadata.get("aliases", [])}
    names.update({name: name for name in fields})
    out = {}
    for key, value in config.items():
        name = names.get(str(key).lstrip("-"))
        if name is None:
            raise UserError(f"{path}: unknown flag {key!r}")
        kind = _flag_type(fields[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{path}: {key} must be one of {', '.join(choices)}, got {value!r}")
        out[name] = value
    return out


def parse_args(cls, argv=None):
    """Build argparse from a dataclass: every field is a `--name` flag with its help text.

    `python train_X.py config.yaml [--flag value ...]`: a YAML/JSON file of the same flags comes
    first, and flags on the command line override it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config = read_config(argv.pop(0), cls) if argv and not argv[0].startswith("-") else {}
    parser = ArgumentParser(description=(cls.__doc__ or "").strip(),
                            usage="%(prog)s [config.yaml] [--flag value ...]")
    for f in dataclasses.fields(cls):
        allowed = parse_range(f.metadata["range"])[1] if "range" in f.metadata else ""
        help_ = f.metadata.get("help", "") + f" ({allowed + '; ' if allowed else ''}default: {f.default})"
        flags = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", [])]
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        else:
            parser.add_argument(*flags, dest=f.name, type=_flag_type(f), default=f.default, help=help_,
                                choices=f.metadata.get("choices"), range=f.metadata.get("range"))
    parser.set_defaults(**config)  # so the config file's values are checked with the command line's
    args = cls(**vars(parser.parse_args(argv)))
    if getattr(args, "report_to", "none") == "tensorboard":
        from nanorlhf.metrics import tensorboard_writer_class

        tensorboard_writer_class()  # fail now, before anything is loaded or written
    if getattr(args, "resume", False) and getattr(args, "overwrite_output_dir", False):
        raise UserError("--resume continues the run in --output_dir and --overwrite_output_dir deletes it: pick one")
    return args


def pick_device(device="auto", dtype="auto"):
    """CUDA with bf16 where it is there (fp16 on GPUs without bf16), else CPU in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
    return device, dtype


def cpu_has_bf16():
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Then a bf16 frozen base is ~2x faster."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(args):
    """Join the other processes under torchrun (nothing otherwise), pick the device and dtype, seed
    every random generator. Returns (world, device, dtype)."""
    world = dist.setup(args.device)
    device, dtype = pick_device(world.device, args.dtype)
    set_seed(args.seed)
    return world, device, dtype
