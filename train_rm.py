"""Stage 3, reward modelling: learn a score that ranks the chosen answer above the rejected one.

    python train_rm.py --model runs/sft-merged --data data/demo/rm.jsonl --output_dir runs/rm
    python merge_lora.py --base runs/sft-merged --adapter runs/rm --output_dir runs/rm-merged

The reward model is the SFT model's backbone with a scalar head (transformers'
AutoModelForSequenceClassification, num_labels=1) read at the EOS that ends the answer. For each
pair the loss is -log sigmoid(r_chosen - r_rejected [- margin]) (Bradley-Terry; InstructGPT eq. 1,
Llama 2's margin). With LoRA the head is trained whole and saved in the adapter (PEFT's
modules_to_save), so merge_lora.py restores it. The merged dir, or a full run's dir, loads with
AutoModelForSequenceClassification.from_pretrained(dir) and scores as nanorlhf does.

--normalize_scores shifts and scales the head after training so that the training prompts' chosen
answers score mean 0, std 1. The scale goes into score.weight; the shift is stored in config.json as
"nanorlhf_score_bias" (transformers' head has no bias): nanorlhf adds it, transformers users add
model.config.nanorlhf_score_bias to the logits themselves.
"""

import dataclasses
import json
import math
import os

import torch
from transformers import AutoModelForSequenceClassification

from nanorlhf import distributed as dist
from nanorlhf.args import BaseArgs, parse_args, start
from nanorlhf.checkpoint import Run, load_weights, save_model
from nanorlhf.data import encode_answer, encode_pairs, pad_with_mask
from nanorlhf.errors import UserError, run_main
from nanorlhf.loading import check_model_dir, describe, load_tokenizer, setup_model
from nanorlhf.metrics import check_finite, info
from nanorlhf.rm import (CONFIG_FILE, SCORE_BIAS, Scorer, collate_pairs, init_head, normalize_head, pair_stats,
                         pairwise_loss, score, score_pairs)
from nanorlhf.training import optimizer_and_schedule, optimizer_step, train_and_held_out


@dataclasses.dataclass
class Args(BaseArgs):
    """Reward model (RM) training on preference pairs; N pairs are one forward of 2N sequences."""
    eval_steps: int = dataclasses.field(default=50, metadata={"help": "eval every N steps and at the end",
                                                              "range": ">0"})
    val_size: float = dataclasses.field(default=0.1, metadata={
        "help": "fraction of --data held out for evaluation when there is no --eval_data (0 = none)",
        "range": "[0,1)"})
    margin_field: str = dataclasses.field(default="", metadata={
        "help": "record field holding a numeric margin for the loss (Llama 2); empty = no margin"})
    normalize_scores: bool = dataclasses.field(default=False, metadata={
        "help": "after training, shift and scale scores to mean 0, std 1 on the training chosen answers"})


def load_pairs(tokenizer, paths, max_length, margin_field=""):
    """Records -> [(chosen_ids, rejected_ids, margin)], each answer after the SFT chat-format prompt
    and ending with the end-of-turn token the score is read at."""
    def encode(where, rec, prompt, chosen, rejected):
        margin = 0.0
        if margin_field:
            if margin_field not in rec:
                raise UserError(f"{where}: missing field {margin_field!r} (--margin_field)")
            margin = rec[margin_field]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise UserError(f"{where}: field {margin_field!r} must be a finite number, got {margin!r}")
        chosen_ids = encode_answer(tokenizer, prompt, chosen, where)
        rejected_ids = encode_answer(tokenizer, prompt, rejected, where)
        return (chosen_ids, rejected_ids, float(margin)), max(len(chosen_ids), len(rejected_ids))

    return encode_pairs(paths, max_length, encode)


@torch.no_grad()
def evaluate(model, pairs, batch_size, pad_id, device):
    model.eval()
    chosen, rejected, margin = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + batch_size], pad_id).items()}
        c, r = score_pairs(model, batch)
        chosen.append(c)
        rejected.append(r)
        margin.append(batch["margin"])
    model.train()
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"eval/loss": pairwise_loss(chosen, rejected, torch.cat(margin)).item(),
            "eval/accuracy": (chosen > rejected).float().mean().item()}


@torch.no_grad()
def chosen_scores(model, pairs, batch_size, pad_id, device):
    """Scores of the chosen answers alone (what --normalize_scores centres and scales)."""
    model.eval()
    scores = []
    for i in range(0, len(pairs), batch_size):
        input_ids, attention_mask = pad_with_mask([p[0] for p in pairs[i:i + batch_size]], pad_id)
        scores.append(score(model, input_ids.to(device), attention_mask.to(device)))
    model.train()
    return torch.cat(scores)


def main():
    args = parse_args(Args)
    world, device, dtype = start(args)  # under torchrun: join the other processes; device, dtype, seed

    # ---- tokenizer and data first: bad input fails before anything is loaded or written
    check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)  # pad distinct from the end of turn
    pad_id = tokenizer.pad_token_id
    train, evals = train_and_held_out(lambda paths: load_pairs(tokenizer, paths, args.max_length, args.margin_field),
                                      args)

    # ---- model: the SFT model's backbone plus a fresh scalar head; LoRA on the backbone, or all of it
    model = setup_model(args, AutoModelForSequenceClassification, device, dtype, tokenizer, lora_exclude=["score"],
                           num_labels=1)
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        init_head(model)  # a causal LM has no head yet (a reward model being trained further keeps its own)
        info("score head: new, initialised N(0, 1/sqrt(d+1))")
    lora = args.finetuning_type == "lora"
    if lora:
        model.score.requires_grad_(True)  # the head is new: trained whole, saved as modules_to_save
    info(f"{len(train)} training pairs, {len(evals)} evaluation pairs; {describe(model)}")

    def save_weights(out_dir):
        save_model(model, tokenizer, out_dir, lora, base_path=os.path.abspath(args.model),
                   task_type="SEQ_CLS", modules_to_save=["score"])
        if lora and hasattr(model.config, SCORE_BIAS):  # merge_lora.py carries it into config.json
            with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump({SCORE_BIAS: getattr(model.config, SCORE_BIAS)}, f, indent=2)

    # ---- optimiser, schedule; the run's output dir, metrics and checkpoints (resumed with --resume)
    steps, optimizer, scheduler = optimizer_and_schedule(args, model, len(train), world.size)
    run = Run(args, world, steps, "rm", save_weights, load_weights=lambda path: load_weights(model, path, lora),
              optimizer=optimizer, scheduler=scheduler)
    scorer = dist.wrap(Scorer(model), world)  # score(model, ...); under torchrun DDP syncs its gradients

    # ---- the loop: score chosen and rejected in one forward, pairwise loss, step, log, evaluate
    model.train()
    window = run.trainer_state.get("window", [])  # per-step statistics since the last log line
    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    with run:  # Ctrl-C: finish this step, save a checkpoint, stop
        for step, micro in run.steps(len(train), global_batch, args.gradient_accumulation_steps):
            shares = [dist.shard(idx, world) for _, idx in micro]  # this rank's share of each micro-batch
            n_pairs = sum(len(idx) for idx in shares)
            chosen_all, rejected_all, total = [], [], 0.0
            for idx in shares:
                batch = {k: v.to(device) for k, v in collate_pairs([train[i] for i in idx], pad_id).items()}
                chosen, rejected = scorer(batch["input_ids"], batch["attention_mask"]).chunk(2)
                loss = pairwise_loss(chosen, rejected, batch["margin"])
                # pair mean over the whole accumulated batch; every rank holds as many pairs, so DDP's
                # average of the ranks' gradients is the gradient of the mean over all of them
                (loss * len(idx) / n_pairs).backward()
                total += loss.item() * len(idx)
                chosen_all.append(chosen.detach())
                rejected_all.append(rejected.detach())
            loss = total / n_pairs
            check_finite(loss, step)
            optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step)
            stats = dist.mean_over_ranks(  # over every rank's pairs (equal shares)
                {"loss": loss, **pair_stats(torch.cat(chosen_all), torch.cat(rejected_all))})
            window.append(stats)
            do_eval = evals and (step % args.eval_steps == 0 or step == steps)
            if step % args.logging_steps == 0 or step == steps or do_eval:
                run.log_window(step, window, (lambda: evaluate(model, evals, args.per_device_train_batch_size,
                                                               pad_id, device)) if do_eval else None,
                               lr=scheduler.get_last_lr()[0], epoch=micro[-1][0])
                window = []
            run.end_step(step, extra={"window": window}, loss=loss, acc=stats["accuracy"])

    if args.normalize_scores:
        scores = chosen_scores(model, train, args.per_device_train_batch_size, pad_id, device)
        mean, std = normalize_head(model, scores)
        info(f"--normalize_scores: training chosen scores had mean {mean:.4f}, std {std:.4f}; now 0 and 1 "
             f"({SCORE_BIAS} = {getattr(model.config, SCORE_BIAS):.6f} in config.json)")
    run.finish(model)


if __name__ == "__main__":
    run_main(main)
