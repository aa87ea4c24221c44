"""Training plumbing shared by the stage scripts: arguments, device, loading, optimiser and
schedule, metrics, checkpoints. The training loops themselves stay visible in each train_*.py."""

import argparse
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch

from nanorlhf import distributed as dist
from nanorlhf.errors import Interrupted, UserError


# ---------------------------------------------------------------- arguments

@dataclasses.dataclass
class BaseArgs:
    """Flags every stage shares (names as in LLaMA-Factory / transformers' TrainingArguments)."""
    model: str = dataclasses.field(default="", metadata={"help": "model directory (transformers format)",
                                                         "aliases": ["model_name_or_path"]})
    data: str = dataclasses.field(default="", metadata={"help": "data file(s), comma-separated: .txt .json .jsonl"})
    eval_data: str = dataclasses.field(default="", metadata={"help": "held-out data file(s)"})
    output_dir: str = dataclasses.field(default="", metadata={"help": "where the model, checkpoints, metrics go"})
    overwrite_output_dir: bool = dataclasses.field(default=False, metadata={
        "help": "delete an earlier run in --output_dir first (otherwise a run there is refused)"})
    max_steps: int = dataclasses.field(default=-1, metadata={"help": "optimizer steps (overrides epochs if > 0)"})
    num_train_epochs: float = dataclasses.field(default=1.0, metadata={"help": "passes over the data"})
    per_device_train_batch_size: int = dataclasses.field(default=8, metadata={"help": "sequences per micro-batch"})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={"help": "micro-batches per step"})
    learning_rate: float = dataclasses.field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = dataclasses.field(default=0.03, metadata={"help": "linear warmup fraction of steps"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    finetuning_type: str = dataclasses.field(default="lora", metadata={"help": "lora | full"})
    lora_rank: int = dataclasses.field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha/r)"})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target: str = dataclasses.field(default="all", metadata={"help": "module names, comma-separated, or all"})
    max_length: int = dataclasses.field(default=512, metadata={"help": "longest sequence in tokens",
                                                               "aliases": ["cutoff_len"]})
    seed: int = dataclasses.field(default=42, metadata={"help": "random seed"})
    logging_steps: int = dataclasses.field(default=10, metadata={"help": "log every N steps"})
    save_steps: int = dataclasses.field(default=0, metadata={"help": "checkpoint every N steps (0 = end only)"})
    save_total_limit: int = dataclasses.field(default=2, metadata={"help": "checkpoints kept (0 = all)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = dataclasses.field(default="auto", metadata={
        "help": "weights: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16; with LoRA only the frozen base "
                "takes it, adapters and heads stay fp32", "choices": ["auto", "fp32", "bf16", "fp16", "float32",
                                                                       "bfloat16", "float16"]})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": "allow a model's own code"})
    report_to: str = dataclasses.field(default="none", metadata={
        "help": "also log to: none | tensorboard (output_dir/tensorboard)", "choices": ["none", "tensorboard"]})


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (exit 2 via UserError) instead of usage + message."""

    def error(self, message):
        raise UserError(message)


def _flag_type(f):
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type) if isinstance(f.type, str) \
        else f.type


def read_config(path, cls):
    """A YAML or JSON file of flags ({"learning_rate": 1e-4, ...}) -> {field name: value}, checked
    the way the command line checks them. Aliases (metadata "aliases") are accepted as keys."""
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
        help_ = f.metadata.get("help", "") + f" (default: {f.default})"
        flags = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", [])]
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        else:
            parser.add_argument(*flags, dest=f.name, type=_flag_type(f), default=f.default, help=help_,
                                choices=f.metadata.get("choices"))
    parser.set_defaults(**config)
    args = cls(**vars(parser.parse_args(argv)))
    if getattr(args, "finetuning_type", "lora") not in ("lora", "full"):
        raise UserError(f"--finetuning_type must be lora or full, got {args.finetuning_type!r}")
    if getattr(args, "report_to", "none") == "tensorboard":
        tensorboard_writer_class()  # fail now, before anything is loaded or written
    if getattr(args, "resume", False) and getattr(args, "overwrite_output_dir", False):
        raise UserError("--resume continues the run in --output_dir and --overwrite_output_dir deletes it: pick one")
    return args


# ---------------------------------------------------------------- device, seed, loading

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


def check_model_dir(path, what="--model"):
    """Fail early, with one line, on a path that is not a transformers model directory."""
    if not path:
        raise UserError(f"{what} is required")
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model directory ({what})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not a model directory (no config.json) ({what})")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise UserError(f"{path}: no .safetensors weights (only safetensors are read, never pickles) ({what})")


def load_tokenizer(path, trust_remote_code=False):
    """The tokenizer of a model dir, given a chat template and a pad distinct from EOS and from the
    end of turn where it lacks them (nanorlhf.template.prepare_tokenizer says what it changed)."""
    from transformers import AutoTokenizer

    from nanorlhf.template import prepare_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
    for line in prepare_tokenizer(tokenizer, path):
        info(line)
    return tokenizer


def load_model(path, cls, device, dtype, trust_remote_code=False, tokenizer=None, **kwargs):
    """Load a transformers model from safetensors only (never a pickle a user was handed); with its
    tokenizer, made to agree with it (an added pad's embedding row, pad and stop ids: template.fit_model)."""
    from nanorlhf.template import fit_model

    check_model_dir(path)
    try:
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                    trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model: {str(e).splitlines()[0]}") from None
    if tokenizer is not None:
        fit_model(model, tokenizer)
    return model.to(device)


# ---------------------------------------------------------------- optimisation

def make_optimizer(model, lr, weight_decay=0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def warmup_cosine(optimizer, total_steps, warmup_ratio=0.03, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * lr (as in nanoGPT)."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(args, batches_per_epoch):
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(batches_per_epoch * args.num_train_epochs / args.gradient_accumulation_steps))


def check_finite(value, step, what="loss"):
    from nanorlhf.errors import TrainingDiverged

    if not math.isfinite(value):
        raise TrainingDiverged(f"{what} is {value} at step {step}; the last good checkpoint is kept")


def optimizer_step(model, optimizer, scheduler, max_grad_norm, step):
    """Clip the gradient norm (and stop on a NaN/inf one, before it reaches the weights), take one
    optimizer step, advance the schedule, clear the gradients."""
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        check_finite(grad_norm.item(), step, "gradient norm")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def batch_order(n, seed, epoch):
    """The shuffled order of the data in one epoch: a pure function of (seed, epoch), so a resumed
    run replays the same order and skips to where it was."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lm_loss_sum(logits, labels):
    """Summed next-token cross entropy over labelled tokens (labels = input_ids, -100 = ignore).

    Returns (sum, count): dividing the sum by the token count of the whole accumulated batch makes
    a step with gradient accumulation the same maths as one big batch."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


# ---------------------------------------------------------------- metrics

def tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report_to tensorboard needs tensorboard: pip install tensorboard") from None
    return SummaryWriter


def _logged_step(line):
    """The step of one metrics.jsonl line; a line cut short by a killed run counts as never logged."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


class Metrics:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl (and to TensorBoard with
    report_to="tensorboard"); close() draws output_dir/curves.png when matplotlib is installed."""

    def __init__(self, output_dir, resume_step=0, report_to="none"):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        self.enabled = dist.is_main()  # under torchrun only rank 0 writes (every rank logs the same numbers)
        if not self.enabled:
            return
        if report_to == "tensorboard":  # purge_step: a resumed run overwrites the steps it redoes
            self.writer = tensorboard_writer_class()(os.path.join(output_dir, "tensorboard"),
                                                     purge_step=resume_step + 1 if resume_step else None)
        if os.path.exists(self.path):  # a resumed run drops the lines logged after its checkpoint
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if resume_step and _logged_step(line) <= resume_step]
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def log(self, step, **values):
        row = {"step": step, **{k: (float(v) if isinstance(v, (float, int, torch.Tensor)) else v)
                                for k, v in values.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.writer.add_scalar(k, v, step)
        return row

    def close(self):
        """Draw the learning curves into output_dir/curves.png (skipped without matplotlib) and
        close the TensorBoard writer. Call it once, when training ends."""
        from nanorlhf.plots import plot_run

        if not self.enabled:
            return
        plot_run(self.output_dir)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------- saving and checkpoints

def prepare_output_dir(output_dir, resume, overwrite=False):
    """Create the output dir; refuse to mix a fresh run into a directory that holds another run
    (metrics.jsonl or a checkpoint), or with overwrite, delete that run first."""
    if not output_dir:
        raise UserError("--output_dir is required")
    holds_run = os.path.exists(os.path.join(output_dir, "metrics.jsonl")) or bool(list_checkpoints(output_dir))
    if holds_run and not resume:
        if not overwrite:
            raise UserError(f"{output_dir}: already holds a run; pass --resume to continue it, "
                            "--overwrite_output_dir to replace it, or choose another dir")
        if dist.is_main():
            info(f"--overwrite_output_dir: deleting the earlier run in {output_dir}")
            shutil.rmtree(output_dir)
        dist.barrier()
    os.makedirs(output_dir, exist_ok=True)


def save_model(model, tokenizer, out_dir, lora, base_path="", task_type="CAUSAL_LM", modules_to_save=None):
    """A LoRA run saves a PEFT adapter; a full run a transformers model dir (safetensors)."""
    from nanorlhf.lora import save_adapter

    os.makedirs(out_dir, exist_ok=True)
    if lora:
        save_adapter(model, out_dir, base_model_name_or_path=base_path, task_type=task_type,
                     modules_to_save=modules_to_save)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def atomic_save(final_dir, write):
    """Call write(tmp_dir), then move its files into final_dir by rename: a run killed at any
    moment leaves either the old files or the new ones, never half a file.

    Under torchrun every rank calls it: rank 0 writes, and no rank goes on until the files are there."""
    if not dist.is_main():
        dist.barrier()
        return
    _atomic_save(final_dir, write)
    dist.barrier()


def _atomic_save(final_dir, write):
    parent = os.path.dirname(os.path.abspath(final_dir))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.basename(final_dir).startswith("checkpoint-"):
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)  # a whole checkpoint appears at once
        return
    os.makedirs(final_dir, exist_ok=True)
    # the file a loader looks for goes last: a dir that has it has everything else
    for name in sorted(os.listdir(tmp), key=lambda n: n in ("config.json", "adapter_config.json")):
        target = os.path.join(final_dir, name)
        if os.path.isdir(target):  # a folder (PPO's critic/) from an earlier save: rename cannot overwrite it
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(trainer_state):
    """Restore this process's random state from a checkpoint (under torchrun: this rank's own)."""
    states = trainer_state.get("rng_per_rank") or [trainer_state["rng"]]
    if len(states) == dist.world_size():
        set_rng_state(states[dist.rank()])
    else:  # saved by another number of processes: give each rank a stream of its own
        info(f"the checkpoint was saved by {len(states)} process(es), this run has {dist.world_size()}: "
             "random streams restart, so the run will not match an uninterrupted one exactly")
        set_seed(1000 * trainer_state["step"] + dist.rank())


def save_checkpoint(output_dir, step, save_weights, trainer_state, save_total_limit=2):
    """output_dir/checkpoint-STEP/: the weights (save_weights(dir)), and trainer_state.pt holding
    optimizer, scheduler, RNG states and whatever else the loop needs to resume exactly.
    Under torchrun every rank calls it; rank 0 writes, with every rank's RNG state in "rng_per_rank"."""
    rng = rng_state()
    if dist.world_size() > 1:
        trainer_state = {**trainer_state, "rng_per_rank": dist.gather(rng)}

    def write(tmp):
        save_weights(tmp)
        torch.save({**trainer_state, "rng": rng, "step": step}, os.path.join(tmp, "trainer_state.pt"))

    atomic_save(os.path.join(output_dir, f"checkpoint-{step}"), write)
    if save_total_limit > 0 and dist.is_main():
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (a half-written one is only ever a .tmp-* dir)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        name = os.path.basename(path)[len("checkpoint-"):]
        if name.isdigit() and os.path.isfile(os.path.join(path, "trainer_state.pt")):
            found.append((int(name), path))
    return [p for _, p in sorted(found)]


def load_trainer_state(checkpoint_dir):
    # weights_only=True: our own file, but never unpickle arbitrary objects.
    return torch.load(os.path.join(checkpoint_dir, "trainer_state.pt"), weights_only=True)


def describe(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(1, total):.2f}%)"


def info(msg):
    if dist.is_main():  # under torchrun only rank 0 speaks
        print(msg, file=sys.stderr, flush=True)


class CtrlC:
    """From creation until restore(), Ctrl-C (SIGINT) asks the training loop to stop after the current
    step rather than at once: a step cut in half (inside optimizer.step(), say) would leave a state no
    checkpoint should hold. The loop checks `pressed` after each step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        info("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def restore(self):
        signal.signal(signal.SIGINT, self._previous)

    def save_or_stop(self, step, steps, save_steps, output_dir, checkpoint):
        """After each optimizer step: call checkpoint() every save_steps steps (not at the last one,
        the final save covers it), and if Ctrl-C was pressed on any rank, save and stop (exit 130).
        Every rank decides together, so they all stop at the same step."""
        stop = dist.any_rank(self.pressed)
        if stop or (save_steps > 0 and step % save_steps == 0 and step < steps):
            checkpoint()
        if stop:
            raise Interrupted(f"saved checkpoint-{step} in {output_dir}; continue with --resume")


def batches_per_epoch(n, batch_size, world_size=1):
    """How many micro-batches micro_batches(n, batch_size, ..., world_size) yields per epoch."""
    return math.ceil((n - n % world_size) / batch_size)


def micro_batches(n, batch_size, seed, skip=0, world_size=1):
    """Endless (epoch, indices) micro-batches over n examples, reshuffled every epoch; the first
    `skip` are passed over (that is how a resumed run finds its place in the data).

    Under torchrun, batch_size is the global micro-batch (per device x world_size) and every epoch
    leaves out its last n % world_size examples (as DistributedSampler(drop_last=True) does), so
    every micro-batch, the last of an epoch included, splits into equal shares over the ranks."""
    used = n - n % world_size
    if used == 0:
        raise UserError(f"{n} examples cannot be shared by {world_size} processes")
    per_epoch = batches_per_epoch(n, batch_size, world_size)
    k = skip
    while True:
        epoch, i = divmod(k, per_epoch)
        order = batch_order(n, seed, epoch)[:used]
        yield epoch, order[i * batch_size:(i + 1) * batch_size]
        k += 1


def setup_model(args, cls, device, dtype, tokenizer, lora_exclude=(), **load_kwargs):
    """Load args.model with `cls`, then add LoRA (frozen base) or train it whole."""
    from nanorlhf.lora import add_lora

    model = load_model(args.model, cls, device, dtype, trust_remote_code=args.trust_remote_code,
                       tokenizer=tokenizer, **load_kwargs)
    if args.finetuning_type == "lora":
        try:
            add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=args.lora_target, exclude=list(lora_exclude))
        except ValueError as e:
            raise UserError(f"--lora_target: {e}") from None
    return model


def load_weights(model, path, lora):
    """Load a checkpoint's weights into an existing model: a PEFT adapter, or full safetensors."""
    from safetensors.torch import load_file

    from nanorlhf.lora import load_adapter

    if lora:
        return load_adapter(model, path)
    state = {}  # model.safetensors, or its shards model-0000k-of-0000n (PPO's critic/ also holds value_head)
    for f in sorted(glob.glob(os.path.join(path, "model*.safetensors"))):
        state.update(load_file(f, device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embeddings
        raise UserError(f"{path}: checkpoint does not match the model ({(missing + unexpected)[:3]})")
    return model


def resume_from(args, model, optimizer, scheduler):
    """Load the newest complete checkpoint into model/optimizer/scheduler/RNG; return its state."""
    checkpoints = list_checkpoints(args.output_dir)
    if not checkpoints:
        info(f"--resume: no checkpoint in {args.output_dir}, starting from scratch")
        return None
    path = checkpoints[-1]
    load_weights(model, path, args.finetuning_type == "lora")
    trainer_state = load_trainer_state(path)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    restore_rng(trainer_state)
    info(f"resumed from {path} (step {trainer_state['step']})")
    return trainer_state
