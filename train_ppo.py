"""Stage 4, PPO: make the SFT policy earn more reward without drifting far from itself.

    python train_ppo.py --sft runs/sft-merged --rm runs/rm-merged --data data/demo/ppo.jsonl --output_dir runs/ppo

One PPO iteration, as in InstructGPT (Ouyang et al. 2022) and TRL's PPOTrainer:
  1. rollout   sample a response to each prompt from the policy (KV cache, stop at EOS)
  2. score     the reward model scores prompt + response (once per sequence)
  3. reference log-probs of the same tokens under the SFT policy (the policy, adapters off)
  4. values    the critic's estimate of future reward before each response token
  5. rewards   -kl_coef * KL on every token, + the score on the last token   (shape_rewards)
  6. GAE       advantages and returns from rewards and values                 (compute_gae)
  7. update    a few epochs over shuffled minibatches of the clipped policy and value losses
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

import torch

from nanorlhf import distributed as dist
from nanorlhf import ppo
from nanorlhf import train_utils as tu
from nanorlhf.data import encode_prompt, prompt_messages, read_records
from nanorlhf.errors import UserError, run_main
from nanorlhf.template import stop_ids
from nanorlhf.ppo_setup import (PolicyAndValue, base_copies, build_models, check_same_tokenizer, is_adapter_dir,
                                load_ppo_checkpoint, save_ppo_checkpoint)
from nanorlhf.rollout import (critic_values, ended_with_eos, generate, logprobs_of, response_mask, reward_scores,
                              trim_padding)


@dataclasses.dataclass
class Args(tu.BaseArgs):
    """PPO on a policy (--sft) and a reward model (--rm)."""
    sft: str = dataclasses.field(default="", metadata={"help": "the SFT policy (a merged model dir)"})
    rm: str = dataclasses.field(default="", metadata={"help": "the reward model: a merged RM dir, or train_rm.py's "
                                                      "LoRA adapter on --sft (then one base serves all roles)"})
    learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "AdamW lr (policy and critic)"})
    warmup_ratio: float = dataclasses.field(default=0.0, metadata={"help": "linear warmup fraction"})
    max_length: int = dataclasses.field(default=256, metadata={"help": "longest prompt in tokens"})
    # rollout
    num_updates: int = dataclasses.field(default=0, metadata={"help": "PPO iterations (0: from epochs/max_steps)"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "responses per PPO iteration "
                                                                "(batch_size / num_samples_per_prompt prompts)"})
    response_length: int = dataclasses.field(default=48, metadata={"help": "max new tokens per response"})
    temperature: float = dataclasses.field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = dataclasses.field(default=0, metadata={"help": "sample from the k likeliest (0 = off)"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus sampling (1.0 = off)"})
    # reward
    kl_coef: float = dataclasses.field(default=0.05, metadata={"help": "KL penalty coefficient beta"})
    kl_estimator: str = dataclasses.field(default="k1", metadata={"help": "k1 | k2 | k3 (Schulman's KL approximators)"})
    target_kl: float = dataclasses.field(default=0.0, metadata={"help": "adaptive KL target (0 = fixed kl_coef)"})
    kl_horizon: int = dataclasses.field(default=10000, metadata={"help": "adaptive KL horizon (Ziegler et al. 2019)"})
    missing_eos_penalty: float = dataclasses.field(default=1.0, metadata={"help": "subtracted from the score of a "
                                                   "response that never ended (0 = off)"})
    reward_clip: float = dataclasses.field(default=0.0, metadata={"help": "clip scores to [-c, c] (0 = off)"})
    whiten_rewards: bool = dataclasses.field(default=False, metadata={"help": "whiten the shaped rewards"})
    # advantages
    advantage_estimator: str = dataclasses.field(default="gae", metadata={"help": "gae | reinforce | rloo | grpo"})
    num_samples_per_prompt: int = dataclasses.field(default=1, metadata={"help": "responses per prompt (rloo/grpo)"})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "discount"})
    lam: float = dataclasses.field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_advantages: bool = dataclasses.field(default=True, metadata={"help": "whiten advantages per batch"})
    # update
    ppo_epochs: int = dataclasses.field(default=4, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = dataclasses.field(default=2, metadata={"help": "optimizer steps per PPO epoch"})
    cliprange: float = dataclasses.field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    cliprange_value: float = dataclasses.field(default=0.2, metadata={"help": "value clip (<= 0 = off)"})
    vf_coef: float = dataclasses.field(default=0.1, metadata={"help": "value loss coefficient"})
    critic_init: str = dataclasses.field(default="rm", metadata={"help": "value head from the rm head, or fresh"})
    recompute_old_logprobs: bool = dataclasses.field(default=False, metadata={"help": "recompute old log-probs "
                                                     "in a training forward instead of reusing the rollout's"})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={"help": "trade compute for memory"})


def load_prompts(tokenizer, paths, max_length):
    prompts, too_long = [], []
    for where, rec in read_records(paths):
        ids = encode_prompt(tokenizer, prompt_messages(rec, where), where)
        if len(ids) > max_length:
            too_long.append(where)
            continue
        prompts.append(ids)
    if not prompts:
        raise UserError(f"{too_long[0]}: no prompt fits in --max_length {max_length} tokens "
                        f"(all {len(too_long)} are longer)")
    if too_long:
        tu.info(f"warning: skipped {len(too_long)} prompts longer than --max_length {max_length} tokens "
                f"(first at {too_long[0]})")
    return prompts


def main():
    args = tu.parse_args(Args)
    if args.advantage_estimator not in ("gae", "reinforce", "rloo", "grpo"):
        raise UserError(f"--advantage_estimator must be gae, reinforce, rloo or grpo, got {args.advantage_estimator!r}")
    if args.advantage_estimator in ("rloo", "grpo") and args.num_samples_per_prompt < 2:
        raise UserError(f"--advantage_estimator {args.advantage_estimator} needs --num_samples_per_prompt >= 2")
    if args.num_samples_per_prompt < 1 or args.batch_size % args.num_samples_per_prompt:
        raise UserError(f"--batch_size {args.batch_size} counts responses: it must be a multiple of "
                        f"--num_samples_per_prompt {args.num_samples_per_prompt}")
    if args.kl_estimator not in ("k1", "k2", "k3"):
        raise UserError(f"--kl_estimator must be k1, k2 or k3, got {args.kl_estimator!r}")
    if args.critic_init not in ("rm", "fresh"):
        raise UserError(f"--critic_init must be rm or fresh, got {args.critic_init!r}")
    world = dist.setup(args.device)  # under torchrun: join the other processes; else nothing
    device, dtype = tu.pick_device(world.device, args.dtype)
    tu.set_seed(args.seed)

    # ---- tokenizers must agree: the reward model reads the policy's token ids
    tu.check_model_dir(args.sft, "--sft")
    if not is_adapter_dir(args.rm):  # an RM adapter (train_rm.py's LoRA output) has no config.json
        tu.check_model_dir(args.rm, "--rm")
    tokenizer = tu.load_tokenizer(args.sft, args.trust_remote_code)
    check_same_tokenizer(tokenizer, tu.load_tokenizer(args.rm, args.trust_remote_code), args.sft, args.rm)
    prompts = load_prompts(tokenizer, args.data, args.max_length)

    # ---- models: policy, reference, reward, critic; see build_models for the memory plan
    use_critic = args.advantage_estimator == "gae"
    m = build_models(args, device, dtype, use_critic, tokenizer)
    policy = m.policy
    eos_ids = stop_ids(tokenizer, policy)  # a response ends at the end-of-turn token or any of the model's EOS
    if world.enabled:  # the models are built alike on every rank; from here each rank samples its own responses
        tu.set_seed(args.seed + world.rank)
    max_positions = getattr(policy.config, "max_position_embeddings", None)
    if max_positions and args.max_length + args.response_length > max_positions:
        raise UserError(f"--max_length {args.max_length} + --response_length {args.response_length} exceeds "
                        f"the model's {max_positions} positions ({args.sft})")
    tu.prepare_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)

    # ---- optimiser over everything trained: policy LoRA, critic LoRA, value head
    params = m.trainable()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5)
    k = args.num_samples_per_prompt
    n_prompts = max(1, args.batch_size // k)  # each iteration: n_prompts prompts x k samples
    if args.num_updates > 0:
        updates = args.num_updates
    elif args.max_steps > 0:
        updates = args.max_steps
    else:  # one iteration per n_prompts prompts, num_train_epochs passes over the prompts
        updates = max(1, int(len(prompts) * args.num_train_epochs) // n_prompts)
    scheduler = tu.warmup_cosine(optimizer, updates, args.warmup_ratio, min_ratio=1.0)  # constant after warmup
    kl_ctl = (ppo.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl > 0
              else ppo.FixedKLController(args.kl_coef))
    update = load_ppo_checkpoint(args, m, optimizer, scheduler, kl_ctl) if args.resume else 0
    metrics = tu.Metrics(args.output_dir, resume_step=update, report_to=args.report_to)
    if n_prompts % world.size:
        raise UserError(f"--batch_size {args.batch_size} / --num_samples_per_prompt {k} = {n_prompts} prompts per "
                        f"iteration cannot be shared equally by {world.size} processes")
    batches = tu.micro_batches(len(prompts), n_prompts, args.seed, skip=update, world_size=world.size)
    local_batch = args.batch_size // world.size  # --batch_size is global: each rank holds its share
    minibatch_size = local_batch // args.num_mini_batches
    micro_size = max(1, minibatch_size // args.gradient_accumulation_steps)
    if minibatch_size < 1 or local_batch % args.num_mini_batches:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of "
                        f"--num_mini_batches {args.num_mini_batches}"
                        + (f" x {world.size} processes" if world.enabled else ""))
    # What is trained, as one module: under torchrun one DDP wrapper syncs the policy's and the critic's gradients
    policy_and_value = dist.wrap(PolicyAndValue(m, args.temperature), world)
    tu.info(f"{len(prompts)} prompts; {updates} PPO iterations of {n_prompts} prompts x {k}; "
            f"policy: {tu.describe(policy)}")
    copies = base_copies(m)
    tu.info(f"memory plan: {m.plan} ({copies} cop{'y' if copies == 1 else 'ies'} of the base weights, "
            f"{dtype} frozen weights)")
    tu.info(f"responses end at {', '.join(repr(tokenizer.convert_ids_to_tokens(i)) for i in eos_ids)}")

    ctrl_c = tu.CtrlC()  # Ctrl-C: finish this iteration, save a checkpoint, stop
    bar = dist.progress_bar(world, total=updates, initial=update, desc="ppo", dynamic_ncols=True)
    try:
        while update < updates:
            t0 = time.time()
            _, idx = next(batches)
            idx = dist.shard(idx, world)  # this rank's share of the iteration's prompts
            batch_prompts = [prompts[i] for i in idx for _ in range(k)]  # prompt-major groups of k

            # ---- 1. rollout (no gradients; dropout is off everywhere, see build_models)
            with m.role("policy") as policy:
                query, query_mask, response, rollout_logprobs = generate(
                    policy, batch_prompts, args.response_length, eos_ids, tokenizer.pad_token_id,
                    args.temperature, args.top_k, args.top_p)
            mask = response_mask(response, eos_ids, tokenizer.pad_token_id)
            t_rollout = time.time()
            with torch.no_grad():
                # ---- 2. score once per sequence; a response that never ended is penalised
                with m.role("reward") as reward_model:  # see build_models: a shared base, in the reward's state
                    scores = reward_scores(reward_model, query, response, mask, query_mask, m.reward_head)
                ended = ended_with_eos(response, eos_ids)
                if args.missing_eos_penalty:
                    scores = torch.where(ended, scores, scores - args.missing_eos_penalty)
                if args.reward_clip > 0:
                    scores = scores.clamp(-args.reward_clip, args.reward_clip)
                tu.check_finite(scores.mean().item(), update + 1, "the reward model's score")
                # ---- 3. reference log-probs: with LoRA, the same weights with the adapters off
                with m.role("reference") as ref_policy:
                    ref_logprobs = logprobs_of(ref_policy, query, response, mask, query_mask, args.temperature)
                with m.role("policy") as policy:
                    old_logprobs = (logprobs_of(policy, query, response, mask, query_mask, args.temperature)
                                    if args.recompute_old_logprobs else rollout_logprobs)
                # ---- 4. values before each token
                values = torch.zeros_like(old_logprobs)
                if use_critic:
                    with m.role("critic") as critic:
                        values = critic_values(critic, m.v_head, query, response, mask, query_mask)
                # ---- 5. KL-shaped token rewards
                rewards = ppo.shape_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value, args.kl_estimator)
                if args.whiten_rewards:
                    rewards = ppo.masked_whiten(rewards, mask, shift_mean=False, reduce=dist.sum_over_ranks)
                # ---- 6. advantages
                if args.advantage_estimator == "gae":
                    advantages, returns = ppo.compute_gae(rewards, values, mask, args.gamma, args.lam)
                elif args.advantage_estimator == "reinforce":
                    advantages = returns = ppo.reinforce_advantages(rewards, mask, args.gamma)
                else:  # rloo / grpo: one number per sequence from its group of k samples
                    sequence_reward = (rewards * mask).sum(1)
                    estimator = ppo.rloo_advantages if args.advantage_estimator == "rloo" else ppo.grpo_advantages
                    advantages = returns = ppo.broadcast_to_tokens(estimator(sequence_reward, k), mask)
                if args.whiten_advantages:
                    advantages = ppo.masked_whiten(advantages, mask, reduce=dist.sum_over_ranks)  # all ranks'
            t_score = time.time()

            # ---- 7. PPO epochs over shuffled minibatches, gradient accumulation inside each
            stats = {"approxkl": [], "clipfrac": [], "pg_loss": [], "vf_loss": [], "vf_clipfrac": [], "entropy": []}
            shares = []  # each micro-batch's weight in its minibatch's loss (and in the logged averages)
            for _ in range(args.ppo_epochs):
                order = torch.randperm(len(batch_prompts), device=query.device)
                for start in range(0, len(batch_prompts), minibatch_size):
                    minibatch = order[start:start + minibatch_size]
                    # The loss is the token mean over the whole minibatch, every rank's part of it: a micro-batch's
                    # (token-mean) loss weighs its tokens / the average rank's tokens, since DDP averages the
                    # ranks' gradients. With one process and no accumulation the weight is exactly 1.
                    rank_tokens = dist.sum_over_ranks(mask[minibatch].sum()) / world.size
                    for micro_start in range(0, len(minibatch), micro_size):
                        mb = minibatch[micro_start:micro_start + micro_size]
                        share = mask[mb].sum() / rank_tokens
                        # only the columns some row of this micro-batch uses (exact; see trim_padding)
                        mb_query, mb_query_mask, mb_response, mb_mask, R = trim_padding(
                            query[mb], query_mask[mb], response[mb], mask[mb])
                        logits, new_values = policy_and_value(mb_query, mb_response, mb_mask, mb_query_mask)
                        new_logprobs = ppo.logprobs_from_logits(logits, mb_response)
                        pg_loss, pg_stats = ppo.policy_loss(new_logprobs, old_logprobs[mb, :R], advantages[mb, :R],
                                                            mb_mask, args.cliprange)
                        loss = pg_loss
                        if use_critic:
                            cliprange_value = args.cliprange_value if args.cliprange_value > 0 else None
                            vf_loss, vf_stats = ppo.value_loss(new_values, values[mb, :R], returns[mb, :R], mb_mask,
                                                               cliprange_value)
                            loss = loss + args.vf_coef * vf_loss
                            stats["vf_loss"].append(vf_loss.detach())
                            stats["vf_clipfrac"].append(vf_stats["clipfrac"])
                        (loss * share).backward()
                        shares.append(share)
                        with torch.no_grad():
                            stats["entropy"].append(ppo.masked_mean(ppo.entropy_from_logits(logits), mb_mask))
                        stats["approxkl"].append(pg_stats["approxkl"])
                        stats["clipfrac"].append(pg_stats["clipfrac"])
                        stats["pg_loss"].append(pg_loss.detach())
                    if args.max_grad_norm > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        tu.check_finite(grad_norm.item(), update + 1, "gradient norm")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            update += 1

            # ---- log: TRL's metric names where the quantity is the same
            with torch.no_grad():
                kl = torch.where(mask > 0, old_logprobs - ref_logprobs, 0.0).sum(1)  # sequence KL, as TRL logs it
                non_score_reward = (rewards * mask).sum(1) - scores if not args.whiten_rewards else -kl_ctl.value * kl
            # each minibatch's token mean (micro-batches weighted as in the loss), averaged over the minibatches
            n_minibatches = args.ppo_epochs * -(-len(batch_prompts) // minibatch_size)
            avg = {name: (torch.stack(xs) * torch.stack(shares)).sum().item() / n_minibatches if xs else 0.0
                   for name, xs in stats.items()}
            row = {
                "objective/scores": scores.mean().item(), "objective/kl": kl.mean().item(),
                "objective/entropy": (-(old_logprobs * mask).sum(1)).mean().item(),
                "objective/non_score_reward": non_score_reward.mean().item(),
                "objective/rlhf_reward": (scores - kl_ctl.value * kl).mean().item(),
                "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
                "policy/entropy_avg": avg["entropy"], "loss/policy_avg": avg["pg_loss"],
                "loss/value_avg": avg["vf_loss"], "val/clipfrac_avg": avg["vf_clipfrac"],
                "val/explained_variance": (
                    ppo.explained_variance(values, returns, mask, reduce=dist.sum_over_ranks).item()
                    if use_critic else 0.0),
                "val/response_length": mask.sum(1).mean().item(), "val/response_length_max": mask.sum(1).max().item(),
                "val/eos_fraction": ended.float().mean().item(),
                "val/first_approxkl": stats["approxkl"][0].item(), "val/first_clipfrac": stats["clipfrac"][0].item(),
                "kl_coef": kl_ctl.value, "lr": scheduler.get_last_lr()[0],
                "time/rollout_s": t_rollout - t0, "time/score_s": t_score - t_rollout,
                "time/update_s": time.time() - t_score, "episodes": update * len(batch_prompts) * world.size,
            }
            row = dist.mean_over_ranks(row)  # each rank measured its equal share of the batch
            tu.check_finite(row["loss/policy_avg"] + row["loss/value_avg"], update, "loss")
            kl_ctl.update(row["objective/kl"], len(batch_prompts) * world.size)
            if update % args.logging_steps == 0 or update == updates or update == 1:
                metrics.log(update, **row)
            bar.update(1)
            bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
            ctrl_c.save_or_stop(update, updates, args.save_steps, args.output_dir,
                                lambda: save_ppo_checkpoint(args, m, tokenizer, optimizer, scheduler, kl_ctl, update))
    finally:
        ctrl_c.restore()
    bar.close()

    metrics.close()  # curves.png (with matplotlib), closes TensorBoard
    dist.check_same_weights(policy_and_value)  # under torchrun: stop if the ranks ever fell out of sync
    tu.atomic_save(args.output_dir, lambda out: m.save(out, tokenizer))
    tu.info(f"saved the policy to {os.path.abspath(args.output_dir)}"
            + (" (a LoRA adapter: merge it with merge_lora.py --base " + args.sft + ")" if m.lora else ""))


if __name__ == "__main__":
    run_main(main)
