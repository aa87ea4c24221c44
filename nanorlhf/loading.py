"""Loading what a stage trains: a model directory's tokenizer and weights (safetensors only) or a .gguf
file's (dequantized), with LoRA added or the whole model trained."""

import glob
import importlib.util
import os

from transformers import AutoTokenizer

from nanorlhf.errors import UserError
from nanorlhf.lora import add_lora
from nanorlhf.metrics import info
from nanorlhf.template import fit_model, prepare_tokenizer


def is_gguf(path):
    return str(path).lower().endswith(".gguf")


def check_model_dir(path, what="--model"):
    """Fail early, with one line, on a path that is neither a transformers model directory nor a .gguf file."""
    if not path:
        raise UserError(f"{what} is required")
    if is_gguf(path):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such GGUF file ({what})")
        return
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model directory ({what})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not a model directory (no config.json) ({what})")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise UserError(f"{path}: no .safetensors weights (only safetensors are read, never pickles) ({what})")


def from_pretrained(cls, path, what, **kwargs):
    """cls.from_pretrained(path) with any failure as one line; a .gguf file through transformers' GGUF reader."""
    if not is_gguf(path):
        try:
            return cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load {what}: {str(e).splitlines()[0]}") from None
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{path}: reading a GGUF file needs {' and '.join(missing)}: "
                        "pip install 'nanorlhf-pipeline[gguf]'")
    folder, name = os.path.split(os.path.abspath(path))
    try:
        return cls.from_pretrained(folder, gguf_file=name, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:  # an architecture or quantization it lacks
        reason = str(e).splitlines()[0].replace(os.path.join(folder, name), "it")
        raise UserError(f"{path}: cannot read this GGUF ({what}): {reason}") from None


def load_tokenizer(path, trust_remote_code=False):
    """The tokenizer of a model dir or .gguf file, given a chat template and a pad distinct from EOS and
    from the end of turn where it lacks them (nanorlhf.template.prepare_tokenizer says what it changed)."""
    tokenizer = from_pretrained(AutoTokenizer, path, "a tokenizer", trust_remote_code=trust_remote_code)
    for line in prepare_tokenizer(tokenizer, path):
        info(line)
    return tokenizer


def load_model(path, cls, device, dtype, trust_remote_code=False, tokenizer=None, **kwargs):
    """Load a transformers model from safetensors only (never a pickle a user was handed) or from a .gguf
    file; with its tokenizer, made to agree with it (an added pad's embedding row, pad and stop ids:
    template.fit_model)."""
    check_model_dir(path)
    if is_gguf(path):  # every weight dequantized to `dtype`: a plain model, which trains and saves as safetensors
        from transformers import GgufConfig  # (one keeping GGUF's packed blocks would refuse save_pretrained)

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    else:
        kwargs["use_safetensors"] = True
    model = from_pretrained(cls, path, "the model", dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
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
