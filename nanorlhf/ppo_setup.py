"""PPO's models and checkpoints: the plumbing train_ppo.py needs, kept out of its loop.

The memory plan for one GPU (LoRA, the default):
    policy     = SFT model + LoRA           reference = the same weights, adapters disabled
    critic     = RM backbone + its own LoRA + a value head
    reward     = the same RM weights, adapters disabled, read through the RM's score head
so two base models sit in memory instead of four. `--finetuning_type full` trains the policy and
the critic whole, which needs separate frozen copies for the reference and the reward.
"""

import dataclasses
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from nanorlhf import train_utils as tu
from nanorlhf.errors import UserError
from nanorlhf.lora import add_lora, save_adapter
from nanorlhf.rollout import critic_values, policy_logits


@dataclasses.dataclass
class PPOModels:
    policy: nn.Module
    ref_policy: nn.Module | None  # None: the policy with its adapters disabled
    critic: nn.Module | None  # None: a critic-free estimator (reinforce / rloo / grpo)
    v_head: nn.Module | None
    reward_model: nn.Module  # the critic itself (LoRA: adapters disabled when scoring) or a copy
    lora: bool
    sft_path: str = ""

    def save(self, out_dir, tokenizer):
        """The policy (a PEFT adapter on --sft, or a full model) + tokenizer; the critic in critic/."""
        tu.save_model(self.policy, tokenizer, out_dir, self.lora, base_path=self.sft_path)
        if self.critic is not None:
            critic_dir = os.path.join(out_dir, "critic")
            os.makedirs(critic_dir, exist_ok=True)
            if self.lora:
                save_adapter(self.critic, critic_dir, task_type="SEQ_CLS")
            else:
                self.critic.save_pretrained(critic_dir, safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()},
                      os.path.join(critic_dir, "value_head.safetensors"))


class PolicyAndValue(nn.Module):
    """What PPO trains, as one module: forward(query, response, mask, query_mask) -> (logits [B, R, V]
    of the policy, temperature-scaled; values [B, R] of the critic, or None without one).

    One module so that one DistributedDataParallel wraps both: DDP syncs the gradients of what runs
    through the forward of the module it wraps, and the critic's values come from its backbone, not
    its forward (TRL's PolicyAndValueWrapper is the same idea). Rollout and scoring use the modules
    themselves, without gradients."""

    def __init__(self, policy, critic, v_head, temperature):
        super().__init__()
        self.policy, self.critic, self.v_head, self.temperature = policy, critic, v_head, temperature

    def forward(self, query, response, mask, query_mask):
        logits = policy_logits(self.policy, query, response, mask, query_mask, self.temperature)
        if self.critic is None:
            return logits, None
        return logits, critic_values(self.critic, self.v_head, query, response, mask, query_mask)


def _frozen(model):
    model.requires_grad_(False)
    return model.eval()


def build_models(args, device, dtype, use_critic, tokenizer):
    """Load and wire the models for PPO. Every model stays in eval mode: dropout would make the
    log-probs of the training forward differ from the rollout's (N+ implementation details)."""
    lora = args.finetuning_type == "lora"
    lora_kwargs = dict(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_target)
    load = lambda path, cls, **kw: tu.load_model(path, cls, device, dtype, args.trust_remote_code,  # noqa: E731
                                                 tokenizer=tokenizer, **kw)
    policy = load(args.sft, AutoModelForCausalLM).eval()
    ref_policy = None
    if lora:
        add_lora(policy, **lora_kwargs)
    else:
        ref_policy = _frozen(load(args.sft, AutoModelForCausalLM))
    reward_model = load(args.rm, AutoModelForSequenceClassification, num_labels=1)
    critic = v_head = None
    if use_critic:
        if lora:
            critic = reward_model.eval()
            add_lora(critic, exclude=["score"], **lora_kwargs)  # freezes the base and the score head
        else:
            critic = load(args.rm, AutoModelForSequenceClassification, num_labels=1).eval()
            critic.score.requires_grad_(False)
        hidden = critic.score.in_features
        v_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        with torch.no_grad():
            if args.critic_init == "rm":  # start the value head where the reward head is
                v_head.weight.copy_(critic.score.weight.float())
            else:  # a fresh head, as the reward head's init (Huang et al. 2024)
                v_head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
            v_head.bias.zero_()
        v_head.to(dtype)
    if not (use_critic and lora):
        _frozen(reward_model)
    if args.gradient_checkpointing:
        for model in (policy, critic):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PPOModels(policy, ref_policy, critic, v_head, reward_model, lora, os.path.abspath(args.sft))


def check_same_tokenizer(policy_tok, rm_tok, policy_path, rm_path):
    """The reward model reads the policy's token ids, so both must map text to the same ids."""
    a, b = policy_tok.get_vocab(), rm_tok.get_vocab()
    if a != b:
        tokens_a, tokens_b = ({i: t for t, i in vocab.items()} for vocab in (a, b))
        i = min(i for i in tokens_a.keys() | tokens_b.keys() if tokens_a.get(i) != tokens_b.get(i))
        raise UserError(f"--sft {policy_path} and --rm {rm_path} have different tokenizers ({len(a)} vs {len(b)} "
                        f"tokens; id {i} is {tokens_a.get(i)!r} vs {tokens_b.get(i)!r}): "
                        "train the reward model from the SFT model")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(policy_tok, name) != getattr(rm_tok, name):
            raise UserError(f"--sft {policy_path} and --rm {rm_path} disagree on {name}")


def save_ppo_checkpoint(args, m, tokenizer, optimizer, scheduler, kl_ctl, update):
    tu.save_checkpoint(args.output_dir, update, lambda out: m.save(out, tokenizer),
                       {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "kl_ctl": kl_ctl.state_dict()}, args.save_total_limit)


def load_ppo_checkpoint(args, m, optimizer, scheduler, kl_ctl):
    """Restore everything the loop carries from the newest checkpoint; returns its iteration."""
    checkpoints = tu.list_checkpoints(args.output_dir)
    if not checkpoints:
        tu.info(f"--resume: no checkpoint in {args.output_dir}, starting from scratch")
        return 0
    path = checkpoints[-1]
    tu.load_weights(m.policy, path, m.lora)
    if m.critic is not None:
        tu.load_weights(m.critic, os.path.join(path, "critic"), m.lora)
        head = load_file(os.path.join(path, "critic", "value_head.safetensors"))
        m.v_head.load_state_dict({k: v.to(m.v_head.weight.device) for k, v in head.items()})
    state = tu.load_trainer_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    tu.restore_rng(state)
    tu.info(f"resumed from {path} (iteration {state['step']})")
    return state["step"]
