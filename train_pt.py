"""Stage 1, continued pretraining: next-token prediction on plain text.

    python train_pt.py --data data/demo/pt.txt --output_dir runs/pt            # builds the tiny model
    python train_pt.py --model Qwen2.5-0.5B --data my.txt --finetuning_type lora --output_dir runs/pt

Documents are joined with EOS between them and cut into blocks of --block_size tokens; the model
learns to predict every next token (Radford et al. 2018). With no --model, a SentencePiece
tokenizer is trained on the data and a small Llama-architecture model is built from scratch: the tiny default that
lets the whole pipeline run on a CPU.
"""

import dataclasses

import torch
from transformers import AutoModelForCausalLM

from nanorlhf import distributed as dist
from nanorlhf.args import BaseArgs, parse_args, start
from nanorlhf.checkpoint import Run, list_checkpoints, load_weights, save_model
from nanorlhf.data import read_records, pack_documents
from nanorlhf.errors import UserError, run_main
from nanorlhf.loading import check_model_dir, describe, load_model, load_tokenizer, setup_model
from nanorlhf.metrics import check_finite, info
from nanorlhf.tiny import build_tiny_model, train_tokenizer
from nanorlhf.training import lm_backward, optimizer_and_schedule, optimizer_step


@dataclasses.dataclass
class Args(BaseArgs):
    """Continued pretraining (PT)."""
    finetuning_type: str = dataclasses.field(default="full", metadata={"help": "lora | full",
                                                                         "choices": ["lora", "full"]})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate", "range": ">=0"})
    block_size: int = dataclasses.field(default=128, metadata={"help": "tokens per training block", "range": ">0"})
    model_size: str = dataclasses.field(default="tiny", metadata={"help": "tiny | small (no --model only)",
                                                                  "choices": ["tiny", "small"]})
    vocab_size: int = dataclasses.field(default=3000, metadata={
        "help": "tokenizer size (no --model only; the 256 bytes and 4 special tokens need 260)", "range": ">=260"})


def main():
    args = parse_args(Args)
    world, device, dtype = start(args)  # under torchrun: join the other processes; device, dtype, seed

    # ---- data: every document as text (checked before anything is written)
    records = read_records(args.data)
    texts = []
    for where, rec in records:
        if not isinstance(rec.get("text"), str):
            raise UserError(f"{where}: a PT record needs a string field 'text'")
        texts.append(rec["text"])

    # ---- model: the user's, or the tiny default built from this data
    checkpoints = list_checkpoints(args.output_dir) if args.resume and args.output_dir else []
    if args.model:
        check_model_dir(args.model)  # fix: a wrong path got the Hub loader's "Repo id must be..." message
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        model = setup_model(args, AutoModelForCausalLM, device, dtype, tokenizer)
    elif checkpoints:  # resuming the tiny default: its tokenizer and weights are in the checkpoint
        tokenizer = load_tokenizer(checkpoints[-1])
        model = load_model(checkpoints[-1], AutoModelForCausalLM, device, dtype)
    else:
        if args.finetuning_type != "full":
            raise UserError("--finetuning_type lora needs a --model to adapt (the tiny default trains in full)")
        info(f"no --model: training a SentencePiece tokenizer and building a {args.model_size} "
             "Llama-architecture model")
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
        model = build_tiny_model(tokenizer, size=args.model_size, max_positions=max(512, args.block_size),
                                 seed=args.seed).to(device=device, dtype=dtype)
    blocks = pack_documents(tokenizer, texts, args.block_size)
    info(f"{len(texts)} documents -> {len(blocks)} blocks of {args.block_size} tokens; {describe(model)}")

    lora = args.finetuning_type == "lora"

    # ---- optimiser, schedule; the run's output dir, metrics and checkpoints (resumed with --resume)
    steps, optimizer, scheduler = optimizer_and_schedule(args, model, len(blocks), world.size)
    run = Run(args, world, steps, "pt", save_weights=lambda out: save_model(model, tokenizer, out, lora, args.model),
              load_weights=lambda path: load_weights(model, path, lora), optimizer=optimizer, scheduler=scheduler)
    ddp_model = dist.wrap(model, world)  # the model itself with one process; under torchrun DDP syncs gradients

    # ---- the loop: accumulate micro-batches, one optimizer step, log, checkpoint
    model.train()
    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    with run:  # Ctrl-C: finish this step, save a checkpoint, stop
        for step, micro in run.steps(len(blocks), global_batch, args.gradient_accumulation_steps):
            inputs = [torch.tensor([blocks[i] for i in dist.shard(idx, world)], device=device)
                      for _, idx in micro]  # this rank's share of each global micro-batch
            # every next token is a target; the token mean over every rank's batch
            loss = lm_backward(ddp_model, [{"input_ids": x, "labels": x} for x in inputs], world.size)
            check_finite(loss, step)
            optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step)
            if step % args.logging_steps == 0 or step == steps:
                run.metrics.log(step, loss=loss, lr=scheduler.get_last_lr()[0], epoch=micro[-1][0])
            run.end_step(step, loss=loss)
    run.finish(model)


if __name__ == "__main__":
    run_main(main)
