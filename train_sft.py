"""Stage 2, supervised fine-tuning: learn to answer like the demonstrations.

    python train_sft.py --model runs/pt --data data/demo/sft.jsonl --output_dir runs/sft
    python merge_lora.py --base runs/pt --adapter runs/sft --output_dir runs/sft-merged

Each dialogue is rendered with the chat template; the loss is next-token cross entropy on the
assistant turns only (the user's words are context, not something to imitate), averaged over
every labelled token of the accumulated batch (Ouyang et al. 2022, InstructGPT, step 1).
"""

import dataclasses
import os

import torch
from transformers import AutoModelForCausalLM

from nanorlhf import distributed as dist
from nanorlhf import train_utils as tu
from nanorlhf.data import IGNORE, collate_lm, encode_dialogue, read_records, to_messages
from nanorlhf.errors import UserError, run_main


@dataclasses.dataclass
class Args(tu.BaseArgs):
    """Supervised fine-tuning (SFT)."""
    eval_steps: int = dataclasses.field(default=50, metadata={"help": "evaluate --eval_data every N steps"})


def load_dialogues(tokenizer, paths, max_length):
    """Records -> (input_ids, labels); too-long dialogues are cut to max_length (and counted)."""
    examples, cut, dropped = [], 0, 0
    for where, rec in read_records(paths):
        messages = to_messages(rec, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: an SFT record needs an assistant answer to learn from")
        ids, labels = encode_dialogue(tokenizer, messages, where)
        if len(ids) > max_length:
            ids, labels, cut = ids[:max_length], labels[:max_length], cut + 1
            if all(label == IGNORE for label in labels[1:]):
                dropped += 1
                continue
        examples.append((ids, labels))
    if cut:
        tu.info(f"warning: {cut} dialogues longer than --max_length {max_length} were truncated "
                f"({dropped} of them dropped: no answer token left)")
    if not examples:
        raise UserError(f"{paths}: no usable dialogue")
    return examples


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(examples[i:i + batch_size], pad_id).items()}
        loss_sum, n = tu.lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / max(1, count)


def main():
    args = tu.parse_args(Args)
    world = dist.setup(args.device)  # under torchrun: join the other processes; else nothing
    device, dtype = tu.pick_device(world.device, args.dtype)
    tu.set_seed(args.seed)

    # ---- tokenizer and data first: bad input fails before anything is loaded or written
    tu.check_model_dir(args.model)
    tokenizer = tu.load_tokenizer(args.model, args.trust_remote_code)
    train = load_dialogues(tokenizer, args.data, args.max_length)
    evals = load_dialogues(tokenizer, args.eval_data, args.max_length) if args.eval_data else []

    # ---- model: LoRA on a frozen base, or the whole model
    model = tu.setup_model(args, AutoModelForCausalLM, device, dtype, tokenizer)
    tu.info(f"{len(train)} dialogues; {tu.describe(model)}")
    tu.prepare_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    lora = args.finetuning_type == "lora"

    def save_weights(out_dir):
        tu.save_model(model, tokenizer, out_dir, lora, base_path=os.path.abspath(args.model))

    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    steps = tu.total_steps(args, tu.batches_per_epoch(len(train), global_batch, world.size))
    optimizer = tu.make_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = tu.warmup_cosine(optimizer, steps, args.warmup_ratio)
    state = tu.resume_from(args, model, optimizer, scheduler) if args.resume else None
    step = state["step"] if state else 0

    def checkpoint():
        tu.save_checkpoint(args.output_dir, step, save_weights,
                           {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           args.save_total_limit)

    metrics = tu.Metrics(args.output_dir, resume_step=step, report_to=args.report_to)
    batches = tu.micro_batches(len(train), global_batch, args.seed, skip=step * args.gradient_accumulation_steps,
                               world_size=world.size)
    ddp_model = dist.wrap(model, world)  # the model itself with one process; under torchrun DDP syncs gradients

    # ---- the loop: accumulate micro-batches, one optimizer step, log, evaluate, checkpoint
    model.train()
    ctrl_c = tu.CtrlC()  # Ctrl-C: finish this step, save a checkpoint, stop
    bar = dist.progress_bar(world, total=steps, initial=step, desc="sft", dynamic_ncols=True)
    try:
        while step < steps:
            micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            inputs = [{k: v.to(device) for k, v in collate_lm([train[i] for i in dist.shard(idx, world)],
                                                              tokenizer.pad_token_id).items()}
                      for _, idx in micro]  # this rank's share of each global micro-batch
            n_tokens = dist.sum_over_ranks(sum((b["labels"][:, 1:] != IGNORE).sum().item() for b in inputs))
            total = 0.0
            for b in inputs:
                logits = ddp_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss_sum, _ = tu.lm_loss_sum(logits, b["labels"])
                # token mean over the whole accumulated batch of every rank (n_tokens is global);
                # x world size because DDP averages the ranks' gradients, and we want their sum
                (loss_sum / n_tokens * world.size).backward()
                total += loss_sum.item()
            loss = dist.sum_over_ranks(total) / n_tokens
            tu.check_finite(loss, step + 1)
            tu.optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step + 1)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % args.logging_steps == 0 or step == steps:
                row = {"loss": loss, "lr": scheduler.get_last_lr()[0], "epoch": micro[-1][0]}
                if evals and (step % args.eval_steps == 0 or step == steps):
                    row["eval/loss"] = evaluate(model, evals, args.per_device_train_batch_size,
                                                tokenizer.pad_token_id, device)
                metrics.log(step, **row)
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
