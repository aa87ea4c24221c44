"""Stage 3', direct preference optimisation: learn the preferences themselves, no reward model, no sampling.

    python train_dpo.py --model runs/sft-merged --data data/demo/rm.jsonl --output_dir runs/dpo
    python merge_lora.py --base runs/sft-merged --adapter runs/dpo --output_dir runs/dpo-merged

From the SFT model and the same preference pairs train_rm.py reads. For each pair the policy's
log-probability of the chosen and of the rejected answer (summed over the answer's tokens, given the
prompt) go into one of the DPO family's losses (nanorlhf/dpo.py, --loss_type):
  sigmoid  DPO (Rafailov et al. 2023), --beta, --label_smoothing (cDPO)      needs the reference
  ipo      IPO (Azar et al. 2023), --beta                                    needs the reference
  simpo    SimPO (Meng et al. 2024), length-normalised, --simpo_beta, --simpo_gamma
  orpo     ORPO (Hong et al. 2024), SFT loss + odds ratio, --orpo_lambda
The reference is the SFT model: with LoRA, the same weights with the adapters off; trained whole, a
frozen copy. Its log-probs never change, so they are computed once, before the first step.
Metrics use TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected; the held-out pairs' rewards/accuracies is DPO's implicit reward model
judged on pairs it never saw.
"""

import dataclasses
import os

import torch
from transformers import AutoModelForCausalLM

from nanorlhf import distributed as dist
from nanorlhf.args import BaseArgs, parse_args, start
from nanorlhf.checkpoint import Run, load_weights, save_model
from nanorlhf.data import IGNORE, collate_lm, encode_dialogue, encode_pairs
from nanorlhf.dpo import LOSS_TYPES, dpo_loss, orpo_loss, sequence_logps, simpo_loss
from nanorlhf.errors import run_main
from nanorlhf.loading import check_model_dir, describe, load_model, load_tokenizer, setup_model
from nanorlhf.lora import disable_adapters
from nanorlhf.metrics import check_finite, info
from nanorlhf.training import optimizer_and_schedule, optimizer_step, train_and_held_out


@dataclasses.dataclass
class Args(BaseArgs):
    """Direct preference optimisation (the DPO family) from an SFT model."""
    loss_type: str = dataclasses.field(default="sigmoid", metadata={
        "help": "sigmoid (DPO) | ipo | simpo | orpo", "choices": list(LOSS_TYPES)})
    beta: float = dataclasses.field(default=0.1, metadata={"help": "DPO / IPO: how far from the reference",
                                                           "range": ">0"})
    label_smoothing: float = dataclasses.field(default=0.0, metadata={"help": "cDPO: how often a label is wrong",
                                                                      "range": "[0,0.5]"})
    simpo_beta: float = dataclasses.field(default=2.0, metadata={"help": "SimPO: reward scale", "range": ">0"})
    simpo_gamma: float = dataclasses.field(default=0.5, metadata={"help": "SimPO: target reward margin",
                                                                  "range": ">=0"})
    orpo_lambda: float = dataclasses.field(default=0.1, metadata={"help": "ORPO: weight of the odds-ratio term",
                                                                  "range": ">=0"})
    learning_rate: float = dataclasses.field(default=5e-5, metadata={"help": "peak learning rate", "range": ">=0"})
    eval_steps: int = dataclasses.field(default=50, metadata={"help": "eval every N steps and at the end",
                                                              "range": ">0"})
    val_size: float = dataclasses.field(default=0.1, metadata={
        "help": "fraction of --data held out for evaluation when there is no --eval_data (0 = none)",
        "range": "[0,1)"})


def load_pairs(tokenizer, paths, max_length):
    """Records -> [((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))]: each answer after the
    SFT chat-format prompt, labelled on the final answer's tokens only (up to its end-of-turn token)."""
    def encode(where, rec, prompt, chosen, rejected):
        encoded = []
        for answer in (chosen, rejected):
            ids, labels = encode_dialogue(tokenizer, prompt + [{"role": "assistant", "content": answer}], where)
            start = len(labels) - next(i for i, label in enumerate(reversed(labels)) if label == IGNORE)
            encoded.append((ids, [IGNORE] * start + labels[start:]))  # earlier assistant turns are context
        return tuple(encoded), max(len(ids) for ids, _ in encoded)

    return encode_pairs(paths, max_length, encode)


def pair_logps(model, pairs, pad_id, device):
    """Summed answer log-probs and answer lengths of B pairs, in one forward over the 2B sequences:
    (chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B])."""
    batch = collate_lm([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logps, lengths = sequence_logps(logits, batch["labels"].to(device))
    return (*logps.chunk(2), *lengths.chunk(2))


@torch.no_grad()
def reference_logps(model, reference, pairs, batch_size, pad_id, device):
    """The reference's (chosen, rejected) log-probs of every pair, [N, 2]: the SFT model's, computed once.
    reference None: the model itself with its adapters off."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        if reference is None:
            with disable_adapters(model):
                chosen, rejected, _, _ = pair_logps(model, pairs[i:i + batch_size], pad_id, device)
        else:
            chosen, rejected, _, _ = pair_logps(reference, pairs[i:i + batch_size], pad_id, device)
        out.append(torch.stack([chosen, rejected], 1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2, device=device)


def preference_loss(args, chosen, rejected, chosen_len, rejected_len, ref):
    """The --loss_type loss of B pairs: (losses [B], chosen_rewards [B], rejected_rewards [B])."""
    if args.loss_type == "simpo":
        return simpo_loss(chosen, rejected, chosen_len, rejected_len, args.simpo_beta, args.simpo_gamma)
    if args.loss_type == "orpo":
        return orpo_loss(chosen, rejected, chosen_len, rejected_len, args.orpo_lambda)
    return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], args.beta, args.loss_type, args.label_smoothing)


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected, prefix=""):
    """TRL's names: the loss, the implicit rewards, how often chosen wins, and the log-probs."""
    return {f"{prefix}loss": losses.mean().item(),
            f"{prefix}rewards/chosen": chosen_rewards.mean().item(),
            f"{prefix}rewards/rejected": rejected_rewards.mean().item(),
            f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            f"{prefix}rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            f"{prefix}logps/chosen": chosen.mean().item(), f"{prefix}logps/rejected": rejected.mean().item()}


@torch.no_grad()
def evaluate(args, model, pairs, ref, pad_id, device):
    """The held-out pairs' loss, implicit-reward accuracy and margins (prefix eval/)."""
    model.eval()
    parts = []
    for i in range(0, len(pairs), args.per_device_train_batch_size):
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, pairs[i:i + args.per_device_train_batch_size],
                                                                pad_id, device)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            args, chosen, rejected, chosen_len, rejected_len, ref[i:i + args.per_device_train_batch_size])
        parts.append((losses, chosen_rewards, rejected_rewards, chosen, rejected))
    model.train()
    return pair_metrics(*(torch.cat(column) for column in zip(*parts)), prefix="eval/")


def main():
    args = parse_args(Args)
    world, device, dtype = start(args)  # under torchrun: join the other processes; device, dtype, seed

    # ---- tokenizer and data first: bad input fails before anything is loaded or written
    check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    train, evals = train_and_held_out(lambda paths: load_pairs(tokenizer, paths, args.max_length), args)

    # ---- the policy (LoRA on the SFT model, or all of it) and the reference's log-probs, computed once
    model = setup_model(args, AutoModelForCausalLM, device, dtype, tokenizer)
    lora = args.finetuning_type == "lora"
    needs_reference = args.loss_type in ("sigmoid", "ipo")
    reference = None
    if needs_reference and not lora:  # trained whole: a frozen copy of the SFT model
        reference = load_model(args.model, AutoModelForCausalLM, device, dtype, args.trust_remote_code,
                               tokenizer=tokenizer).eval().requires_grad_(False)
    ref_train, ref_evals = (torch.zeros(len(train), 2, device=device), torch.zeros(len(evals), 2, device=device))
    if needs_reference:
        ref_train = reference_logps(model, reference, train, args.per_device_train_batch_size, pad_id, device)
        ref_evals = reference_logps(model, reference, evals, args.per_device_train_batch_size, pad_id, device)
        del reference  # its log-probs are all the loss needs
    info(f"{len(train)} training pairs, {len(evals)} evaluation pairs; --loss_type {args.loss_type}; "
         f"{describe(model)}")

    # ---- optimiser, schedule; the run's output dir, metrics and checkpoints (resumed with --resume)
    steps, optimizer, scheduler = optimizer_and_schedule(args, model, len(train), world.size)
    run = Run(args, world, steps, "dpo",
              save_weights=lambda out: save_model(model, tokenizer, out, lora, os.path.abspath(args.model)),
              load_weights=lambda path: load_weights(model, path, lora), optimizer=optimizer, scheduler=scheduler)
    ddp_model = dist.wrap(model, world)  # the model itself with one process; under torchrun DDP syncs gradients

    # ---- the loop: chosen and rejected in one forward, the preference loss, step, log, evaluate
    model.train()
    window = run.trainer_state.get("window", [])  # per-step statistics since the last log line
    pairs_seen = run.trainer_state.get("pairs", 0)  # every rank's, so far
    global_batch = args.per_device_train_batch_size * world.size  # every rank takes per_device of each
    with run:  # Ctrl-C: finish this step, save a checkpoint, stop
        for step, micro in run.steps(len(train), global_batch, args.gradient_accumulation_steps):
            shares = [dist.shard(idx, world) for _, idx in micro]  # this rank's share of each micro-batch
            n_pairs = sum(len(idx) for idx in shares)
            pairs_seen += sum(len(idx) for _, idx in micro)
            parts = []
            for idx in shares:
                chosen, rejected, chosen_len, rejected_len = pair_logps(ddp_model, [train[i] for i in idx], pad_id,
                                                                        device)
                losses, chosen_rewards, rejected_rewards = preference_loss(args, chosen, rejected, chosen_len,
                                                                           rejected_len, ref_train[idx])
                # pair mean over the whole accumulated batch; every rank holds as many pairs (as in train_rm.py)
                (losses.sum() / n_pairs).backward()
                parts.append((losses.detach(), chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach()))
            stats = dist.mean_over_ranks(pair_metrics(*(torch.cat(column) for column in zip(*parts))))
            check_finite(stats["loss"], step)
            optimizer_step(model, optimizer, scheduler, args.max_grad_norm, step)
            window.append(stats)
            do_eval = evals and (step % args.eval_steps == 0 or step == steps)
            if step % args.logging_steps == 0 or step == steps or do_eval:
                run.log_window(step, window, (lambda: evaluate(args, model, evals, ref_evals, pad_id, device))
                               if do_eval else None, lr=scheduler.get_last_lr()[0], epoch=micro[-1][0],
                               pairs=pairs_seen)
                window = []
            run.end_step(step, extra={"window": window, "pairs": pairs_seen}, loss=stats["loss"],
                         acc=stats["rewards/accuracies"])
    run.finish(model)


if __name__ == "__main__":
    run_main(main)
