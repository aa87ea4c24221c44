"""Stage 1, continued pretraining: next-token prediction on plain text.

    python train_pt.py --data data/demo/pt.txt --output_dir runs/pt            # builds the tiny model
    python train_pt.py --model Qwen2.5-0.5B --data my.txt --finetuning_type lora --output_dir runs/pt

Documents are joined with EOS between them and cut into blocks of --block_size tokens; the model
learns to predict every next token (Radford et al. 2018). With no --model, a SentencePiece
tokenizer is trained on the data and a small Llama-architecture model is built from scratch: the tiny default that
lets the whole pipeline run on a CPU.
"""

import dataclasses
import os

import torch
from transformers import AutoModelForCausalLM

from nanorlhf import distributed as dist
from nanorlhf import train_utils as tu
from nanorlhf.data import read_records, pack_documents
from nanorlhf.errors import UserError, run_main
from nanorlhf.tiny import build_tiny_model, train_tokenizer


@dataclasses.dataclass
class Args(tu.BaseArgs):
    """Continued pretraining (PT)."""
    finetuning_type: str = dataclasses.field(default="full", metadata={"help": "lora | full"})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate"})
    block_size: int = dataclasses.field(default=128, metadata={"help": "tokens per training block"})
    model_size: str = dataclasses.field(default="tiny", metadata={"help": "tiny | small (no --model only)"})
    vocab_size: int = dataclasses.field(default=3000, metadata={"help": "tokenizer size (no --model only)"})


def main():
    args = tu.parse_args(Args)
    world = dist.setup(args.device)  # under torchrun: join the other processes; else nothing
    device, dtype = tu.pick_device(world.device, args.dtype)
    tu.set_seed(args.seed)

    # ---- data: every document as text (checked before anything is written)
    records = read_records(args.data)
    texts = []
    for where, rec in records:
        if not isinstance(rec.get("text"), str):
            raise UserError(f"{where}: a PT record needs a string field 'text'")
        texts.append(rec["text"])

    # ---- model: the user's, or the tiny default built from this data
    checkpoints = tu.list_checkpoints(args.output_dir) if args.resume and args.output_dir else []
    if args.model:
        tu.check_model_dir(args.model)  # fix: a wrong path got the Hub loader's "Repo id must be..." message
        tokenizer = tu.load_tokenizer(args.model, args.trust_remote_code)
        model = tu.setup_model(args, AutoModelForCausalLM, device, dtype, tokenizer)
    elif checkpoints:  # resuming the tiny default: its tokenizer and weights are in the checkpoint
        tokenizer = tu.load_tokenizer(checkpoints[-1])
        model = tu.load_model(checkpoints[-1], AutoModelForCausalLM, device, dtype)
    else:
        if args.finetuning_type != "full":
            raise UserError("--finetuning_type lora needs a --model to adapt (the tiny default trains in full)")
        tu.info(f"no --model: training a SentencePiece tokenizer and building a {args.model_size} "
                "Llama-architecture model")
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
        model = build_tiny_model(tokenizer, size=args.model_size, max_positions=max(512, args.block_size),
                                 seed=args.seed).to(device=device, dtype=dtype)
    blocks = pack_documents(tokenizer, texts, args.block_size)
    tu.info(f"{len(texts)} documents -> {len(blocks)} blocks of {args.block_size} tokens; {tu.describe(model)}")

    tu.prepare_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    lora = args.finetuning_type == "lora"
    base_path = args.model

    def save_weights(out_dir):
        tu.save_model(model, tokenizer, out_dir, lora, base_path)

    def checkpoint():
        tu.save_checkpoint(args.output_dir, step, save_weights,
                           {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           args.save_total_limit)

    # ---- optimiser, schedule, resume
    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    steps = tu.total_steps(args, tu.batches_per_epoch(len(blocks), global_batch, world.size))
    optimizer = tu.make_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = tu.warmup_cosine(optimizer, steps, args.warmup_ratio)
    state = tu.resume_from(args, model, optimizer, scheduler) if args.resume else None
    step = state["step"] if state else 0
    metrics = tu.Metrics(args.output_dir, resume_step=step, report_to=args.report_to)
    batches = tu.micro_batches(len(blocks), global_batch, args.seed, skip=step * args.gradient_accumulation_steps,
                               world_size=world.size)
    ddp_model = dist.wrap(model, world)  # the model itself with one process; under torchrun DDP syncs gradients

    # ---- the loop: accumulate micro-batches, one optimizer step, log, checkpoint
    model.train()
    ctrl_c = tu.CtrlC()  # Ctrl-C: finish this step, save a checkpoint, stop
    bar = dist.progress_bar(world, total=steps, initial=step, desc="pt", dynamic_ncols=True)
    try:
        while step < steps:
            micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            inputs = [torch.tensor([blocks[i] for i in dist.shard(idx, world)], device=device)
                      for _, idx in micro]  # this rank's share of each global micro-batch
            n_tokens = dist.sum_over_ranks(sum(x[:, 1:].numel() for x in inputs))  # every next token is a target
            total = 0.0
            for x in inputs:
                loss_sum, _ = tu.lm_loss_sum(ddp_model(input_ids=x).logits, x)
                # token mean over every rank's batch; x world size because DDP averages the ranks' gradients
                (loss_sum / n_tokens * world.size).backward()
                total += loss_sum.item()
            loss = dist.sum_over_ranks(total) / n_tokens
            tu.check_finite(loss, step + 1)
            tu.optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step + 1)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % args.logging_steps == 0 or step == steps:
                metrics.log(step, loss=loss, lr=scheduler.get_last_lr()[0], epoch=micro[-1][0])
            ctrl_c.save_or_stop(step, steps, args.save_steps, args.output_dir, checkpoint)
    finally:
        ctrl_c.restore()
    bar.close()

    metrics.close()  # curves.png (with matplotlib), closes TensorBoard
    dist.check_same_weights(model)  # under torchrun: stop if the ranks ever fell out of sync
    tu.atomic_save(args.output_dir, save_weights)
    tu.info(f"saved to {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    run_main(main)
