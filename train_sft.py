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
from nanorlhf.args import BaseArgs, parse_args, start
from nanorlhf.checkpoint import Run, load_weights, save_model
from nanorlhf.data import IGNORE, collate_lm, encode_dialogue, read_records, to_messages
from nanorlhf.errors import UserError, run_main
from nanorlhf.loading import check_model_dir, describe, load_tokenizer, setup_model
from nanorlhf.metrics import check_finite, info
from nanorlhf.training import lm_backward, lm_forward_loss_sum, optimizer_and_schedule, optimizer_step


@dataclasses.dataclass
class Args(BaseArgs):
    """Supervised fine-tuning (SFT)."""
    eval_steps: int = dataclasses.field(default=50, metadata={"help": "evaluate --eval_data every N steps",
                                                              "range": ">0"})


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
        info(f"warning: {cut} dialogues longer than --max_length {max_length} were truncated "
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
        loss_sum, n = lm_forward_loss_sum(model, batch)
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / max(1, count)


def main():
    args = parse_args(Args)
    world, device, dtype = start(args)  # under torchrun: join the other processes; device, dtype, seed

    # ---- tokenizer and data first: bad input fails before anything is loaded or written
    check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    train = load_dialogues(tokenizer, args.data, args.max_length)
    evals = load_dialogues(tokenizer, args.eval_data, args.max_length) if args.eval_data else []

    # ---- model: LoRA on a frozen base, or the whole model
    model = setup_model(args, AutoModelForCausalLM, device, dtype, tokenizer)
    info(f"{len(train)} dialogues; {describe(model)}")
    lora = args.finetuning_type == "lora"

    # ---- optimiser, schedule; the run's output dir, metrics and checkpoints (resumed with --resume)
    steps, optimizer, scheduler = optimizer_and_schedule(args, model, len(train), world.size)
    run = Run(args, world, steps, "sft",
              save_weights=lambda out: save_model(model, tokenizer, out, lora, os.path.abspath(args.model)),
              load_weights=lambda path: load_weights(model, path, lora), optimizer=optimizer, scheduler=scheduler)
    ddp_model = dist.wrap(model, world)  # the model itself with one process; under torchrun DDP syncs gradients

    # ---- the loop: accumulate micro-batches, one optimizer step, log, evaluate, checkpoint
    model.train()
    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    with run:  # Ctrl-C: finish this step, save a checkpoint, stop
        for step, micro in run.steps(len(train), global_batch, args.gradient_accumulation_steps):
            inputs = [{k: v.to(device) for k, v in collate_lm([train[i] for i in dist.shard(idx, world)],
                                                              tokenizer.pad_token_id).items()}
                      for _, idx in micro]  # this rank's share of each global micro-batch
            loss = lm_backward(ddp_model, inputs, world.size)  # the token mean over every rank's batch
            check_finite(loss, step)
            optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step)
            if step % args.logging_steps == 0 or step == steps:
                row = {"loss": loss, "lr": scheduler.get_last_lr()[0], "epoch": micro[-1][0]}
                if evals and (step % args.eval_steps == 0 or step == steps):
                    row["eval/loss"] = evaluate(model, evals, args.per_device_train_batch_size,
                                                tokenizer.pad_token_id, device)
                run.metrics.log(step, **row)
            run.end_step(step, loss=loss)
    run.finish(model)


if __name__ == "__main__":
    run_main(main)
