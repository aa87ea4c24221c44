"""Stage 4, PPO: make the SFT policy earn more reward without drifting far from itself.

    python train_ppo.py --sft runs/sft-merged --rm runs/rm-merged --data data/demo/ppo.jsonl --output_dir runs/ppo

One PPO iteration, as in InstructGPT (Ouyang et al. 2022) and TRL's PPOTrainer:
  1. rollout   sample a response to each prompt from the policy, KV cache, stop at EOS      (generate)
  2. score     the reward model scores prompt + response, once per sequence    (penalize_scores)
  3. reference log-probs of the same tokens under the SFT policy (the policy, adapters off)
  4. values    the critic's estimate of future reward before each response token
  5. rewards   -kl_coef * KL on every token, + the score on the last token       (shape_rewards)
  6. GAE       advantages and returns from rewards and values              (estimate_advantages)
  7. update    a few epochs over shuffled minibatches of the clipped policy and value losses (ppo_loss)
The rollout is one dict of [B, ...] tensors (nanorlhf/sampling.py); a minibatch is the same dict indexed
by its rows.
Memory plan (one GPU): with --rm a LoRA reward adapter trained on the SFT model, ONE frozen base
serves all four roles, each with its own adapter (policy, reward, critic) or none (reference).
With a merged reward model: the policy is the SFT model + LoRA and the reference the same weights
with the adapters off; the critic is the RM's backbone + its own LoRA and a value head, and the
reward the same weights with the adapters off. One or two base models instead of four.
Every choice a researcher ablates is a flag with the usual value as default; defaults follow
TRL's PPOConfig and Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
"""

import dataclasses
import os
import time
from collections import defaultdict

import torch

from nanorlhf import distributed as dist
from nanorlhf import ppo
from nanorlhf.args import BaseArgs, parse_args, set_seed, start
from nanorlhf.checkpoint import Run
from nanorlhf.data import encode_prompt, prompt_messages, read_records
from nanorlhf.errors import UserError, run_main
from nanorlhf.forward import (PolicyAndValue, critic_values, logprobs_of, reward_scores, reward_scores_of_texts,
                              trim_padding)
from nanorlhf.loading import describe
from nanorlhf.metrics import check_finite, info
from nanorlhf.ppo_models import build_models, describe_plan, load_tokenizers
from nanorlhf.rewards import compute_rewards, load_reward_fns
from nanorlhf.sampling import decode_responses, ended_with_eos, generate
from nanorlhf.template import stop_ids
from nanorlhf.training import warmup_cosine


@dataclasses.dataclass
class Args(BaseArgs):
    """PPO on a policy (--sft) and a reward model (--rm)."""
    sft: str = dataclasses.field(default="", metadata={"help": "the SFT policy (a merged model dir or a .gguf file)"})
    rm: str = dataclasses.field(default="", metadata={"help": "the reward model: a merged RM dir, or train_rm.py's "
                                                      "LoRA adapter on --sft (then one base serves all roles)"})
    learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "AdamW lr (policy and critic)",
                                                                     "range": ">=0"})
    warmup_ratio: float = dataclasses.field(default=0.0, metadata={"help": "linear warmup fraction", "range": "[0,1]"})
    max_length: int = dataclasses.field(default=256, metadata={"help": "longest prompt in tokens", "range": ">0"})
    # rollout
    num_updates: int = dataclasses.field(default=0, metadata={"help": "PPO iterations (0: from epochs/max_steps)",
                                                              "range": ">=0"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "responses per PPO iteration "
                                                                "(batch_size / num_samples_per_prompt prompts)",
                                                              "range": ">0"})
    response_length: int = dataclasses.field(default=48, metadata={"help": "max new tokens per response",
                                                                   "range": ">0"})
    temperature: float = dataclasses.field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)",
                                                                  "range": ">=0"})
    top_k: int = dataclasses.field(default=0, metadata={"help": "sample from the k likeliest (0 = off)",
                                                        "range": ">=0"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus sampling (1.0 = off)", "range": "[0,1]"})
    # reward
    kl_coef: float = dataclasses.field(default=0.05, metadata={"help": "KL penalty coefficient beta", "range": ">=0"})
    kl_estimator: str = dataclasses.field(default="k1", metadata={"help": "k1 | k2 | k3 (Schulman's KL approximators)",
                                                                  "choices": ["k1", "k2", "k3"]})
    target_kl: float = dataclasses.field(default=0.0, metadata={"help": "adaptive KL target (0 = fixed kl_coef)",
                                                                "range": ">=0"})
    kl_horizon: int = dataclasses.field(default=10000, metadata={"help": "adaptive KL horizon (Ziegler et al. 2019)",
                                                                 "range": ">0"})
    missing_eos_penalty: float = dataclasses.field(default=1.0, metadata={"help": "subtracted from the score of a "
                                                   "response that never ended (0 = off)", "range": ">=0"})
    reward_clip: float = dataclasses.field(default=0.0, metadata={"help": "clip scores to [-c, c] (0 = off)",
                                                                  "range": ">=0"})
    whiten_rewards: bool = dataclasses.field(default=False, metadata={"help": "whiten the shaped rewards"})
    # advantages
    advantage_estimator: str = dataclasses.field(default="gae", metadata={
        "help": "gae | reinforce | rloo | grpo", "choices": ["gae", "reinforce", "rloo", "grpo"]})
    num_samples_per_prompt: int = dataclasses.field(default=1, metadata={"help": "responses per prompt (rloo/grpo)",
                                                                         "range": ">0"})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "discount", "range": "[0,1]"})
    lam: float = dataclasses.field(default=0.95, metadata={"help": "GAE lambda", "range": "[0,1]"})
    whiten_advantages: bool = dataclasses.field(default=True, metadata={"help": "whiten advantages per batch"})
    clamp_stop_advantage: bool = dataclasses.field(default=False, metadata={
        "help": "never push the end of turn down: its advantage raised to >= 0, after whitening (docs/demo.md)"})
    # update
    ppo_epochs: int = dataclasses.field(default=4, metadata={"help": "passes over each rollout batch", "range": ">0"})
    num_mini_batches: int = dataclasses.field(default=2, metadata={"help": "optimizer steps per PPO epoch",
                                                                   "range": ">0"})
    cliprange: float = dataclasses.field(default=0.2, metadata={"help": "policy ratio clip epsilon", "range": ">0"})
    cliprange_value: float = dataclasses.field(default=0.2, metadata={"help": "value clip (<= 0 = off)",
                                                                      "range": "any"})
    vf_coef: float = dataclasses.field(default=0.1, metadata={"help": "value loss coefficient", "range": ">=0"})
    critic_init: str = dataclasses.field(default="rm", metadata={"help": "value head from the rm head, or fresh",
                                                                 "choices": ["rm", "fresh"]})
    # rewards a program computes (nanorlhf/rewards.py), alone or beside the reward model
    reward_fn: str = dataclasses.field(default="", metadata={"help": "reward function(s) FILE.py:NAME or "
                                       "package.module:NAME, comma-separated, summed (e.g. nanorlhf.rewards:accuracy)"})
    reward_fn_kwargs: str = dataclasses.field(default="", metadata={"help": "JSON object of keyword arguments "
                                              "for the reward function(s)"})
    rm_weight: float = dataclasses.field(default=1.0, metadata={"help": "score = rm_weight * rm + "
                                                                 "reward_fn_weight * fn", "range": "any"})
    reward_fn_weight: float = dataclasses.field(default=1.0, metadata={"help": "see --rm_weight", "range": "any"})
    rm_tokenizer_mismatch: str = dataclasses.field(default="error", metadata={
        "help": "a reward model with another tokenizer: error, or retokenize (it scores the decoded text)",
        "choices": ["error", "retokenize"]})
    recompute_old_logprobs: bool = dataclasses.field(default=False, metadata={"help": "recompute old log-probs "
                                                     "in a training forward instead of reusing the rollout's"})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={"help": "trade compute for memory"})


def check_args(args, world):
    """Every flag combination PPO refuses, checked once, before anything is loaded (each flag's own range
    and choices were checked when the flags were parsed)."""
    group = args.num_samples_per_prompt
    if args.advantage_estimator in ("rloo", "grpo") and group < 2:
        raise UserError(f"--advantage_estimator {args.advantage_estimator} needs --num_samples_per_prompt >= 2")
    if args.batch_size % group:
        raise UserError(f"--batch_size {args.batch_size} counts responses: it must be a multiple of "
                        f"--num_samples_per_prompt {group}")
    if not args.rm and not args.reward_fn:
        raise UserError("--rm (a reward model) or --reward_fn (a reward function) is required")
    prompts_per_update = max(1, args.batch_size // group)
    if prompts_per_update % world.size:
        raise UserError(f"--batch_size {args.batch_size} / --num_samples_per_prompt {group} = {prompts_per_update} "
                        f"prompts per iteration cannot be shared equally by {world.size} processes")
    local_batch_size = args.batch_size // world.size
    if local_batch_size // args.num_mini_batches < 1 or local_batch_size % args.num_mini_batches:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of "
                        f"--num_mini_batches {args.num_mini_batches}"
                        + (f" x {world.size} processes" if world.enabled else ""))


def load_prompts(tokenizer, paths, max_length):
    """Each prompt record as {"ids", "messages", "text" (its last turn), "record", "where"}: the record and
    where it came from go to the reward functions."""
    prompts, too_long = [], []
    for where, rec in read_records(paths):
        messages = prompt_messages(rec, where)
        ids = encode_prompt(tokenizer, messages, where)
        if len(ids) > max_length:
            too_long.append(where)
            continue
        prompts.append({"ids": ids, "messages": messages, "text": messages[-1]["content"], "record": rec,
                        "where": where})
    if not prompts:
        raise UserError(f"{too_long[0]}: no prompt fits in --max_length {max_length} tokens "
                        f"(all {len(too_long)} are longer)")
    if too_long:
        info(f"warning: skipped {len(too_long)} prompts longer than --max_length {max_length} tokens "
             f"(first at {too_long[0]})")
    return prompts


def score_responses(models, rollout, batch_prompts, tokenizer, reward_fns, args):
    """Step 2: the reward model's score and/or the reward functions' of each response, weighted and summed
    ([B]); and the mean of each source, for the log."""
    scores, means = 0.0, {}
    texts = decode_responses(tokenizer, rollout) if reward_fns or models.rm_tokenizer else None
    if "reward" in models.roles:
        with models.role("reward") as reward_model:  # a shared base, in the reward's adapter state
            if models.rm_tokenizer is None:  # it reads the policy's token ids
                rm_scores = reward_scores(reward_model, rollout, models.reward_head)
            else:
                rm_scores = reward_scores_of_texts(reward_model, models.rm_tokenizer,
                                                   [p["messages"] for p in batch_prompts], texts, models.reward_head)
        scores, means["objective/rm_scores"] = args.rm_weight * rm_scores.to(rollout["logprobs"].device), rm_scores
    if reward_fns:
        fn_scores = torch.tensor(compute_rewards(reward_fns, [p["text"] for p in batch_prompts], texts,
                                                 [p["record"] for p in batch_prompts],
                                                 [p["where"] for p in batch_prompts]),
                                 dtype=torch.float32, device=rollout["logprobs"].device)
        scores, means["objective/fn_scores"] = scores + args.reward_fn_weight * fn_scores, fn_scores
    return scores, {name: values.mean().item() for name, values in means.items()}


def ppo_loss(policy_and_value, mb, args, losses):
    """Step 7's loss on one micro-batch: the clipped policy loss, plus vf_coef x the clipped value loss with
    a critic. Appends the statistics the log averages to `losses`."""
    logits, vpred = policy_and_value(mb)
    new_logprobs = ppo.logprobs_from_logits(logits, mb["response"])
    pg_loss, pg_stats = ppo.policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"],
                                        args.cliprange)
    loss = pg_loss
    if vpred is not None:
        vf_loss, vf_stats = ppo.value_loss(vpred, mb["values"], mb["returns"], mb["response_mask"],
                                           args.cliprange_value if args.cliprange_value > 0 else None)
        loss = loss + args.vf_coef * vf_loss
        losses["vf_loss"].append(vf_loss.detach())
        losses["vf_clipfrac"].append(vf_stats["clipfrac"])
    with torch.no_grad():
        losses["entropy"].append(ppo.masked_mean(ppo.entropy_from_logits(logits), mb["response_mask"]))
    losses["approxkl"].append(pg_stats["approxkl"])
    losses["clipfrac"].append(pg_stats["clipfrac"])
    losses["pg_loss"].append(pg_loss.detach())
    return loss


@torch.no_grad()
def iteration_metrics(rollout, rewards, ended, losses, weights, n_minibatches, kl_coef, args):
    """One row of metrics.jsonl: TRL's names where the quantity is the same. `losses`: per micro-batch
    statistics of the update, each weighted as in the loss (`weights`)."""
    mask, logprobs, scores = rollout["response_mask"], rollout["logprobs"], rollout["scores"]
    kl = torch.where(mask > 0, logprobs - rollout["ref_logprobs"], 0.0).sum(1)  # sequence KL (k1), as TRL logs it
    non_score_reward = (rewards * mask).sum(1) - scores if not args.whiten_rewards else -kl_coef * kl
    # each minibatch's token mean (micro-batches weighted as in the loss), averaged over the minibatches
    avg = {name: (torch.stack(xs) * torch.stack(weights)).sum().item() / n_minibatches for name, xs in losses.items()}
    row = {
        "objective/scores": scores.mean().item(), "objective/kl": kl.mean().item(),
        "objective/entropy": (-(logprobs * mask).sum(1)).mean().item(),
        "objective/non_score_reward": non_score_reward.mean().item(),
        "objective/rlhf_reward": (scores - kl_coef * kl).mean().item(),
        "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
        "policy/entropy_avg": avg["entropy"], "loss/policy_avg": avg["pg_loss"],
        "loss/value_avg": avg.get("vf_loss", 0.0), "val/clipfrac_avg": avg.get("vf_clipfrac", 0.0),
        "val/explained_variance": (ppo.explained_variance(rollout["values"], rollout["returns"], mask,
                                                          reduce=dist.sum_over_ranks).item()
                                   if "vf_loss" in losses else 0.0),
        "val/response_length": mask.sum(1).mean().item(), "val/response_length_max": mask.sum(1).max().item(),
        "val/eos_fraction": ended.float().mean().item(),
        "val/first_approxkl": losses["approxkl"][0].item(), "val/first_clipfrac": losses["clipfrac"][0].item(),
    }
    if args.kl_estimator != "k1":  # the KL that shaped the rewards, by its estimator's name
        shaped_kl = torch.where(mask > 0, ppo.kl_penalty(logprobs, rollout["ref_logprobs"], args.kl_estimator), 0.0)
        row[f"objective/kl_{args.kl_estimator}"] = shaped_kl.sum(1).mean().item()
    return row


def main():
    args = parse_args(Args)
    world, device, dtype = start(args)  # under torchrun: join the other processes; device, dtype, seed
    check_args(args, world)

    # ---- tokenizers (a reward model reads the policy's token ids, or --rm_tokenizer_mismatch retokenize),
    # reward functions, prompts
    tokenizer, rm_tokenizer = load_tokenizers(args)
    reward_fns = load_reward_fns(args.reward_fn, args.reward_fn_kwargs)
    prompts = load_prompts(tokenizer, args.data, args.max_length)

    # ---- models: policy, reference, reward, critic; see nanorlhf/ppo_models.py for the memory plan
    use_critic = args.advantage_estimator == "gae"
    models = build_models(args, device, dtype, use_critic, tokenizer, rm_tokenizer)
    eos_ids = stop_ids(tokenizer, models.policy)  # a response ends at the end of turn or any of the model's EOS
    if world.enabled:  # the models are built alike on every rank; from here each rank samples its own responses
        set_seed(args.seed + world.rank)

    # ---- sizes derived from the flags (check_args made sure they divide)
    group = args.num_samples_per_prompt  # responses sampled per prompt (RLOO's and GRPO's group)
    prompts_per_update = max(1, args.batch_size // group)  # each iteration: prompts_per_update prompts x group
    local_batch_size = args.batch_size // world.size  # --batch_size is global: each rank samples its share
    minibatch_size = local_batch_size // args.num_mini_batches
    micro_batch_size = max(1, minibatch_size // args.gradient_accumulation_steps)
    n_minibatches = args.ppo_epochs * args.num_mini_batches  # optimizer steps per iteration
    if args.num_updates > 0 or args.max_steps > 0:
        num_updates = args.num_updates if args.num_updates > 0 else args.max_steps
    else:  # num_train_epochs passes over the prompts
        num_updates = max(1, int(len(prompts) * args.num_train_epochs) // prompts_per_update)
    info(f"{len(prompts)} prompts; {num_updates} PPO iterations of {prompts_per_update} prompts x {group}; "
         f"policy: {describe(models.policy)}")
    info(f"memory plan: {describe_plan(models, dtype)}")
    info(f"responses end at {', '.join(repr(tokenizer.convert_ids_to_tokens(i)) for i in eos_ids)}")

    # ---- optimiser over everything trained (policy LoRA, critic LoRA, value head); the run and its checkpoints
    params = models.trainable()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5)
    scheduler = warmup_cosine(optimizer, num_updates, args.warmup_ratio, min_ratio=1.0)  # constant after warmup
    kl_ctl = (ppo.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl > 0
              else ppo.FixedKLController(args.kl_coef))
    run = Run(args, world, num_updates, "ppo", save_weights=lambda out: models.save(out, tokenizer),
              load_weights=models.load, optimizer=optimizer, scheduler=scheduler, kl_ctl=kl_ctl)
    # What is trained, as one module: under torchrun one DDP wrapper syncs the policy's and the critic's gradients
    policy_and_value = dist.wrap(PolicyAndValue(models, args.temperature), world)

    episodes = run.trainer_state.get("episodes", 0)  # responses sampled so far (a resumed run's from its checkpoint)
    with run:  # Ctrl-C: finish this iteration, save a checkpoint, stop
        for update, micro in run.steps(len(prompts), prompts_per_update):
            t0 = time.time()
            _, idx = micro[0]  # one batch of prompt indices per iteration (an epoch's last may be short)
            batch_prompts = [prompts[i] for i in dist.shard(idx, world) for _ in range(group)]  # prompt-major
            episodes += len(idx) * group

            # ---- 1. rollout (no gradients; dropout is off everywhere, see build_models)
            with models.role("policy") as policy:
                rollout = generate(policy, [p["ids"] for p in batch_prompts], args.response_length, eos_ids,
                                   tokenizer.pad_token_id, args.temperature, args.top_k, args.top_p)
            mask = rollout["response_mask"]
            t_rollout = time.time()
            with torch.no_grad():
                # ---- 2. score once per sequence (reward model, reward functions); a response that never
                # ended is penalised
                scores, score_means = score_responses(models, rollout, batch_prompts, tokenizer, reward_fns, args)
                ended = ended_with_eos(rollout["response"], eos_ids)
                scores = ppo.penalize_scores(scores, ended, args.missing_eos_penalty, args.reward_clip)
                check_finite(scores.mean().item(), update, "the reward model's score")
                rollout["scores"] = scores
                # ---- 3. reference log-probs: with LoRA, the same weights with the adapters off
                with models.role("reference") as ref_policy:
                    rollout["ref_logprobs"] = logprobs_of(ref_policy, rollout, args.temperature)
                if args.recompute_old_logprobs:  # else the rollout's own log-probs are the old ones
                    with models.role("policy") as policy:
                        rollout["logprobs"] = logprobs_of(policy, rollout, args.temperature)
                # ---- 4. values before each token
                rollout["values"] = torch.zeros_like(rollout["logprobs"])
                if use_critic:
                    with models.role("critic") as critic:
                        rollout["values"] = critic_values(critic, models.v_head, rollout)
                # ---- 5. KL-shaped token rewards
                rewards = ppo.shape_rewards(scores, rollout["logprobs"], rollout["ref_logprobs"], mask, kl_ctl.value,
                                            args.kl_estimator)
                if args.whiten_rewards:
                    rewards = ppo.masked_whiten(rewards, mask, shift_mean=False, reduce=dist.sum_over_ranks)
                # ---- 6. advantages (and the critic's targets): GAE, or a critic-free estimator
                advantages, returns = ppo.estimate_advantages(rewards, rollout["values"], mask,
                                                              args.advantage_estimator, args.gamma, args.lam, group)
                if args.whiten_advantages:
                    advantages = ppo.masked_whiten(advantages, mask, reduce=dist.sum_over_ranks)  # all ranks'
                if args.clamp_stop_advantage:  # the blame for a bad answer stays off its EOS token
                    advantages = ppo.clamp_stop_advantages(advantages, mask, ended)
                rollout["advantages"], rollout["returns"] = advantages, returns
            t_score = time.time()

            # ---- 7. PPO epochs over shuffled minibatches, gradient accumulation inside each
            losses, weights = defaultdict(list), []  # per micro-batch; weights: its share of its minibatch's loss
            for _ in range(args.ppo_epochs):
                order = torch.randperm(len(batch_prompts), device=mask.device)
                for first in range(0, len(batch_prompts), minibatch_size):
                    minibatch = order[first:first + minibatch_size]
                    # The loss is the token mean over the whole minibatch, every rank's part of it: a micro-batch's
                    # (token-mean) loss weighs its tokens / the average rank's tokens, since DDP averages the
                    # ranks' gradients. With one process and no accumulation the weight is exactly 1.
                    rank_tokens = dist.sum_over_ranks(mask[minibatch].sum()) / world.size
                    for micro_start in range(0, len(minibatch), micro_batch_size):
                        # one micro-batch, without the columns no row of it uses (exact; see trim_padding)
                        mb = trim_padding({key: x[minibatch[micro_start:micro_start + micro_batch_size]]
                                           for key, x in rollout.items()})
                        weight = mb["response_mask"].sum() / rank_tokens
                        (ppo_loss(policy_and_value, mb, args, losses) * weight).backward()
                        weights.append(weight)
                    if args.max_grad_norm > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        check_finite(grad_norm.item(), update, "gradient norm")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            # ---- log, adapt the KL coefficient, checkpoint
            row = {**iteration_metrics(rollout, rewards, ended, losses, weights, n_minibatches, kl_ctl.value, args),
                   **score_means,
                   "kl_coef": kl_ctl.value, "lr": scheduler.get_last_lr()[0], "episodes": episodes,
                   "time/rollout_s": t_rollout - t0, "time/score_s": t_score - t_rollout,
                   "time/update_s": time.time() - t_score}
            row = dist.mean_over_ranks(row)  # each rank measured its equal share of the batch
            check_finite(row["loss/policy_avg"] + row["loss/value_avg"], update, "loss")
            kl_ctl.update(row["objective/kl"], len(batch_prompts) * world.size)
            if update % args.logging_steps == 0 or update == num_updates or update == 1:
                run.metrics.log(update, **row)
            run.end_step(update, extra={"episodes": episodes}, score=row["objective/scores"], kl=row["objective/kl"])
    run.finish(policy_and_value, f"saved the policy to {os.path.abspath(args.output_dir)}" + (
        f" (a LoRA adapter: merge it with merge_lora.py --base {args.sft})" if models.lora else ""))


if __name__ == "__main__":
    run_main(main)
