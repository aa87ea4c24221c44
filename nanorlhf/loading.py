"""Loading what a stage trains: a model directory's tokenizer and weights (safetensors only), with
LoRA added or the whole model trained."""

import glob
import os

from transformers import AutoTokenizer

from nanorlhf.errors import UserError
from nanorlhf.lora import add_lora
from nanorlhf.metrics import info
from nanorlhf.template import fit_model, prepare_tokenizer


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
    check_model_dir(path)
    try:
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                    trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model: {str(e).splitlines()[0]}") from None
    if tokenizer is not None:
        fit_model(model, tokenizer)
    return model.to(device)


def setup_model(args, cls, device, dtype, tokenizer, lora_exclude=(), **load_kwargs):
    """Load args.model with `cls`, then add LoRA (frozen base) or train it whole."""
    model = load_model(args.model, cls, device, dtype, trust_remote_code=args.trust_remote_code,
                       tokenizer=tokenizer, **load_kwargs)
    if args.finetuning_type == "lora":
        add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                 targets=args.lora_target, exclude=list(lora_exclude))  # a --lora_target matching nothing: UserError
    return model


def describe(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(1, total):.2f}%)"
