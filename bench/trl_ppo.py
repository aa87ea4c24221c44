"""The benchmark's TRL side: the same PPO workload as train_ppo.py, run by TRL's PPOTrainer.

    python bench/trl_ppo.py --sft DIR --rm DIR --data PROMPTS --output_dir DIR --timings OUT.json [...]

TRL removed PPOTrainer after 1.12.0, so this needs `pip install "trl==1.12.0"` (the `bench` extra);
it lives at trl.experimental.ppo. What is matched to train_ppo.py, so both sides do the same work:
  - the models: policy and reference from --sft; reward model and critic (TRL's value model) from
    --rm. LoRA on both the policy and the critic (same rank, alpha and target layers as nanorlhf's
    "all"), the critic's score head trained as its value head; or both trained whole (--finetuning_type full);
  - the rollout: the same prompt ids, batch, response length and temperature (top-k/top-p off);
  - the update: PPO epochs, minibatches, one optimizer step per minibatch (per_device_train_batch_size =
    batch / minibatches through TRL's micro-batch loop, no gradient accumulation), AdamW with eps 1e-5,
    no gradient clipping (TRL's PPOTrainer never clips, so the nanorlhf side runs with --max_grad_norm 0);
  - no gradient checkpointing and no autocast (TRL's PPOConfig defaults both on; nanorlhf has neither):
    weights in the dtype nanorlhf picks (fp32 on CPU, bf16 on CUDA).
Timings per iteration go to --timings: rollout (TRL's batch_generation), score (the reference, value
and reward forwards), update (from the first training forward to the end of the step), iteration.
"""

import argparse
import json
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

from nanorlhf.args import pick_device
from nanorlhf.data import encode_prompt, prompt_messages, read_records
from nanorlhf.loading import load_tokenizer
from nanorlhf.metrics import info


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", required=True)
    p.add_argument("--rm", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--timings", required=True, help="where to write the per-iteration timings (JSON)")
    p.add_argument("--finetuning_type", default="lora", choices=["lora", "full"])
    p.add_argument("--num_updates", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_mini_batches", type=int, default=2)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--response_length", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--setup", default="matched", choices=["matched", "standard"], help="matched: the workload and "
                   "memory choices of train_ppo.py (above); standard: TRL's own PPO setup, the policy and the value "
                   "model trained whole with PPOConfig's defaults (gradient checkpointing...)")
    return p.parse_args()


def lora_targets(model):
    """nanorlhf's --lora_target all: every nn.Linear but the output heads, by PEFT's name suffix."""
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in ("lm_head", "score")})


def install_timers(ppo_module, timings, marker=None):
    """Wrap the module-level functions PPOTrainer.train calls, to time its phases."""
    batch_generation, forward = ppo_module.batch_generation, ppo_module.forward
    wrapper_cls = ppo_module.PolicyAndValueWrapper
    state = {"iteration": {}}

    def timed_batch_generation(model, queries, *args, **kwargs):
        state["iteration"] = it = {"start": time.perf_counter()}
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        it["rollout_end"] = time.perf_counter()
        it["response_tokens"] = (query_responses.shape[1] - queries.shape[1]) * queries.shape[0]
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        it = state["iteration"]
        if isinstance(getattr(model, "module", model), wrapper_cls) and "update_start" not in it:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            it["update_start"] = time.perf_counter()  # the first training forward of this iteration
        return forward(model, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state_, control, **kwargs):
            state["last_end"] = time.perf_counter()
            if marker:  # bench/peak.py: the models are loaded, training begins
                open(marker, "w").close()

        def on_step_end(self, args, state_, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now, it = time.perf_counter(), state["iteration"]
            timings.append({
                "iter_s": now - state["last_end"],
                "rollout_s": it["rollout_end"] - it["start"],
                "score_s": it["update_start"] - it["rollout_end"],
                "update_s": now - it["update_start"],
                "response_tokens": it["response_tokens"],
            })
            state["last_end"] = now

    ppo_module.batch_generation, ppo_module.forward = timed_batch_generation, timed_forward
    return StepTimer()


def main():
    args = parse_args()
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    device, dtype = pick_device()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.sft)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    prompts = [encode_prompt(tokenizer, prompt_messages(r, where)) for where, r in read_records(args.data)]
    dataset = Dataset.from_dict({"input_ids": prompts})

    load = lambda path, cls, **kw: cls.from_pretrained(path, dtype=dtype, **kw).to(device)  # noqa: E731
    policy = load(args.sft, AutoModelForCausalLM)
    reward_model = load(args.rm, AutoModelForSequenceClassification, num_labels=1)
    value_model = load(args.rm, AutoModelForSequenceClassification, num_labels=1)
    ref_model, peft_config = None, None
    if args.setup == "standard":  # TRL's PPO example: four models, policy and value model trained whole
        args.finetuning_type = "full"
    if args.finetuning_type == "lora":
        lora = {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0,
                "target_modules": lora_targets(policy)}
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)  # PPOTrainer wraps the policy itself
        # in place, not a PeftModel wrapper: TRL reads value_model.model and value_model.score
        value_model = inject_adapter_in_model(LoraConfig(**lora), value_model)
        value_model.requires_grad_(False)
        for name, param in value_model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith("score."))
    else:
        ref_model = load(args.sft, AutoModelForCausalLM)

    workload = dict(  # the same work on both sides, whatever the setup
        output_dir=args.output_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=args.seed, learning_rate=args.learning_rate, use_cpu=device.type == "cpu",
        total_episodes=args.num_updates * args.batch_size,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=args.batch_size, num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.ppo_epochs, response_length=args.response_length, temperature=args.temperature,
        stop_token="eos", missing_eos_penalty=1.0, num_sample_generations=0, kl_coef=0.05,
    )
    if args.setup == "standard":  # everything else as PPOConfig has it (on a CPU: fp32, no autocast)
        config = PPOConfig(**workload, bf16=False, fp16=False)
    else:
        config = PPOConfig(
            **workload, lr_scheduler_type="constant", optim="adamw_torch", adam_epsilon=1e-5, weight_decay=0.0,
            bf16=False, fp16=False, gradient_checkpointing=False,
            kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
            whiten_rewards=False,
        )
    timings = []
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_model,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         peft_config=peft_config,
                         callbacks=[install_timers(ppo_module, timings, args.timings + ".loaded")])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    info(f"TRL PPOTrainer: {len(prompts)} prompts, {args.num_updates} iterations, "
            f"{trainable:,} trainable parameters")
    trainer.train()
    with open(args.timings, "w") as f:
        json.dump({"iterations": timings, "trainable_params": trainable}, f)


if __name__ == "__main__":
    main()
