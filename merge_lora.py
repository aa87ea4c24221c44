"""Fold a LoRA adapter into its base model: W <- W + (alpha/r) B A, then save a plain model.

    python merge_lora.py --base runs/pt --adapter runs/sft --output_dir runs/sft-merged

The result is an ordinary transformers directory (safetensors + tokenizer) that the next stage,
AutoModelForCausalLM, or AutoModelForSequenceClassification (for a reward model) loads. The
adapter's task_type says which: CAUSAL_LM for PT/SFT/PPO, SEQ_CLS for a reward model (whose
trained score head is saved in the adapter and restored here).
"""

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from nanorlhf.args import ArgumentParser
from nanorlhf.errors import UserError, run_main
from nanorlhf.files import atomic_save
from nanorlhf.loading import check_model_dir, load_model, load_tokenizer
from nanorlhf.lora import load_adapter, merge_lora
from nanorlhf.metrics import info


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base the adapter was trained on: a model dir or .gguf file")
    parser.add_argument("--adapter", required=True, help="a PEFT-format LoRA adapter directory")
    parser.add_argument("--output_dir", required=True, help="where the merged model goes")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto (the base's own) | float32 | bfloat16 | float16")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the base model's own code")
    args = parser.parse_args()

    config_path = os.path.join(args.adapter, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{args.adapter}: not an adapter directory (no adapter_config.json)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: malformed JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(config, dict):  # fix: valid JSON that is not an object gave an AttributeError traceback
        raise UserError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    task_type = config.get("task_type", "CAUSAL_LM")
    if task_type == "SEQ_CLS":
        cls, kwargs = AutoModelForSequenceClassification, {"num_labels": 1}
    else:
        cls, kwargs = AutoModelForCausalLM, {}

    # Merge in float32 (exact enough to match PEFT), then save in the requested dtype.
    check_model_dir(args.base, "--base")  # fix: a wrong --base was reported as a wrong "--model"
    # The adapter's tokenizer (its pad, a <pad> row the base must grow) is the one the adapter was trained with.
    tokenizer_dir = args.adapter if os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json")) else args.base
    tokenizer = load_tokenizer(tokenizer_dir, args.trust_remote_code)
    model = load_model(args.base, cls, torch.device("cpu"), torch.float32, args.trust_remote_code,
                          tokenizer=tokenizer, **kwargs)
    dtype = model.config.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        load_adapter(model, args.adapter)
    except ValueError as e:  # fix: load_adapter's message starts with the adapter path (it was doubled)
        raise UserError(str(e)) from None
    except KeyError as e:  # fix: an adapter_config.json without r/lora_alpha/target_modules gave a traceback
        raise UserError(f"{config_path}: missing field {e}") from None
    merge_lora(model)
    model.to(dtype or torch.float32)
    if task_type == "SEQ_CLS":
        # train_rm.py --normalize_scores leaves the score's offset beside the adapter: into config.json.
        extra = os.path.join(args.adapter, "nanorlhf_config.json")
        if os.path.isfile(extra):
            with open(extra, encoding="utf-8") as f:
                model.config.update(json.load(f))

    def write(out_dir):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

    os.makedirs(args.output_dir, exist_ok=True)
    atomic_save(args.output_dir, write)
    info(f"merged {args.adapter} into {args.base} -> {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    run_main(main)
