"""PPO's models and checkpoints: the plumbing train_ppo.py needs, kept out of its loop.

The memory plans for one GPU (LoRA, the default), by what --rm is:
  - an RM adapter trained on the SFT model (train_rm.py's LoRA output): ONE frozen base for all four
        policy    = base + the "policy" adapter          reference = the base, adapters off
        reward    = base + the "reward" adapter + the RM's score head
        critic    = base + its own "critic" adapter (from the reward adapter, or fresh) + a value head
  - a merged reward model: two bases
        policy    = SFT model + LoRA                     reference = the same weights, adapters off
        critic    = RM backbone + its own LoRA + a value head
        reward    = the same RM weights, adapters off, read through the RM's score head
`--finetuning_type full` trains the policy and the critic whole, which needs separate frozen copies
for the reference and the reward. Each role names the model it runs on and the adapter state to
run it in (`PPOModels.roles`): an adapter's name, OFF (the base alone), or None (the model as is).
"""

import contextlib
import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from nanorlhf import train_utils as tu
from nanorlhf.errors import UserError
from nanorlhf.lora import (LoRALinear, active_adapter, add_lora, disable_adapters, load_adapter, read_adapter_tensors,
                           save_adapter, use_adapter)
from nanorlhf.rm import CONFIG_FILE, SCORE_BIAS
from nanorlhf.rollout import critic_values, policy_logits

OFF = "off"  # a role that runs on the base weights alone


def in_role(model, adapter):
    """The adapter state a role runs in: an adapter's name, OFF, or None (leave the model as it is)."""
    if adapter is None:
        return contextlib.nullcontext(model)
    return disable_adapters(model) if adapter == OFF else use_adapter(model, adapter)


@dataclasses.dataclass
class PPOModels:
    roles: dict  # "policy" | "reference" | "reward" | "critic" -> (model, adapter state); critic absent without one
    v_head: nn.Module | None
    reward_head: nn.Module  # the reward model's score head (its bias: --normalize_scores' offset)
    lora: bool
    plan: str  # "one base" | "two bases" | "four models", for the log
    sft_path: str = ""

    @property
    def policy(self):
        return self.roles["policy"][0]

    @property
    def critic(self):
        return self.roles.get("critic", (None, None))[0]

    def trainable(self):
        """Every parameter PPO trains, each once (policy and critic may share a base)."""
        params = {id(p): p for role in ("policy", "critic") if role in self.roles
                  for p in self.roles[role][0].parameters() if p.requires_grad}
        return list(params.values()) + (list(self.v_head.parameters()) if self.v_head is not None else [])

    @contextlib.contextmanager
    def role(self, name):
        """`with m.role("reward") as model:` the model of a role, in that role's adapter state."""
        model, adapter = self.roles[name]
        with in_role(model, adapter):
            yield model

    def _trained(self, role):
        """(model, the name of the adapter PPO trains on it) of the policy or the critic."""
        model, adapter = self.roles[role]
        return model, adapter if adapter not in (None, OFF) else active_adapter(model)

    def save(self, out_dir, tokenizer):
        """The policy (a PEFT adapter on --sft, or a full model) + tokenizer; the critic in critic/."""
        policy, adapter = self._trained("policy")
        if self.lora:
            save_adapter(policy, out_dir, base_model_name_or_path=self.sft_path, adapter=adapter)
        else:
            policy.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if "critic" in self.roles:
            critic, adapter = self._trained("critic")
            critic_dir = os.path.join(out_dir, "critic")
            os.makedirs(critic_dir, exist_ok=True)
            if self.lora:
                save_adapter(critic, critic_dir, task_type="SEQ_CLS", adapter=adapter)
            else:
                critic.save_pretrained(critic_dir, safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()},
                      os.path.join(critic_dir, "value_head.safetensors"))

    def load(self, checkpoint_dir):
        """The weights save() wrote, back into these models (resume)."""
        policy, adapter = self._trained("policy")
        if self.lora:
            load_adapter(policy, checkpoint_dir, adapter=adapter)
        else:
            tu.load_weights(policy, checkpoint_dir, lora=False)
        if "critic" in self.roles:
            critic, adapter = self._trained("critic")
            critic_dir = os.path.join(checkpoint_dir, "critic")
            if self.lora:
                load_adapter(critic, critic_dir, adapter=adapter)
            else:
                tu.load_weights(critic, critic_dir, lora=False)
            head = load_file(os.path.join(critic_dir, "value_head.safetensors"))
            self.v_head.load_state_dict({k: v.to(self.v_head.weight.device) for k, v in head.items()})


def base_copies(m):
    """How many copies of the base weights the plan holds (the log says it)."""
    models = {id(model): model for model, _ in m.roles.values()}
    return len(models)


class PolicyAndValue(nn.Module):
    """What PPO trains, as one module: forward(query, response, mask, query_mask) -> (logits [B, R, V]
    of the policy, temperature-scaled; values [B, R] of the critic, or None without one).

    One module so that one DistributedDataParallel wraps both: DDP syncs the gradients of what runs
    through the forward of the module it wraps, and the critic's values come from its backbone, not
    its forward (TRL's PolicyAndValueWrapper is the same idea). Rollout and scoring use the modules
    themselves, without gradients. On one shared base, each pass runs with its own adapter."""

    def __init__(self, m, temperature):
        super().__init__()
        (self.policy, self.policy_adapter), critic = m.roles["policy"], m.roles.get("critic", (None, None))
        self.critic, self.critic_adapter = critic
        self.v_head, self.temperature = m.v_head, temperature

    def forward(self, query, response, mask, query_mask):
        with in_role(self.policy, self.policy_adapter):
            logits = policy_logits(self.policy, query, response, mask, query_mask, self.temperature)
        if self.critic is None:
            return logits, None
        with in_role(self.critic, self.critic_adapter):
            return logits, critic_values(self.critic, self.v_head, query, response, mask, query_mask)


def _frozen(model):
    model.requires_grad_(False)
    return model.eval()


def is_adapter_dir(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _value_head(score_weight, critic_init, device):
    """A value head [d] -> 1 with a bias, from the reward head (critic_init "rm") or fresh."""
    hidden = score_weight.size(1)
    v_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        if critic_init == "rm":  # start the value head where the reward head is
            v_head.weight.copy_(score_weight.float())
        else:  # a fresh head, as the reward head's init (Huang et al. 2024)
            v_head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
        v_head.bias.zero_()
    return v_head


def _reward_head(score_weight, bias, device):
    """The reward model's score head as a module of its own: weight [1, d] and the stored offset as bias."""
    head = nn.Linear(score_weight.size(1), 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(score_weight.float())
        head.bias.fill_(bias)
    return _frozen(head)


def _check_rm_adapter(args):
    """An RM adapter shares PPO's base only if it was trained on the SFT model."""
    with open(os.path.join(args.rm, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    base = config.get("base_model_name_or_path") or ""
    if config.get("task_type") != "SEQ_CLS" or "score" not in (config.get("modules_to_save") or []):
        raise UserError(f"--rm {args.rm}: not a reward-model adapter (task_type SEQ_CLS with its score head, as "
                        "train_rm.py --finetuning_type lora writes)")
    if not (base and os.path.isdir(base) and os.path.samefile(base, args.sft)):
        raise UserError(f"--rm {args.rm}: the adapter was trained on {base or 'an unknown base'}, not on --sft "
                        f"{args.sft}; train the reward model on the SFT model, or pass a merged reward model")
    if args.finetuning_type != "lora":
        raise UserError("--rm as an adapter shares the SFT model's frozen weights: it needs --finetuning_type lora "
                        "(or merge it with merge_lora.py)")


def build_models(args, device, dtype, use_critic, tokenizer):
    """Load and wire the models for PPO. Every model stays in eval mode: dropout would make the
    log-probs of the training forward differ from the rollout's (N+ implementation details)."""
    lora = args.finetuning_type == "lora"
    lora_kwargs = dict(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_target)
    load = lambda path, cls, **kw: tu.load_model(path, cls, device, dtype, args.trust_remote_code,  # noqa: E731
                                                 tokenizer=tokenizer, **kw)
    sft_path = os.path.abspath(args.sft)
    if is_adapter_dir(args.rm):  # ---- one base for all four roles
        _check_rm_adapter(args)
        base = load(args.sft, AutoModelForCausalLM).eval()
        load_adapter(base, args.rm, adapter="reward")
        score = read_adapter_tensors(args.rm, ["score"])["score.weight"]
        bias_file = os.path.join(args.rm, CONFIG_FILE)
        bias = json.load(open(bias_file, encoding="utf-8")).get(SCORE_BIAS, 0.0) if os.path.isfile(bias_file) else 0.0
        roles = {"policy": (base, "policy"), "reference": (base, OFF), "reward": (base, "reward")}
        for layer in (m for m in base.modules() if isinstance(m, LoRALinear)):
            layer.lora_A["reward"].requires_grad_(False)  # read, never trained
            layer.lora_B["reward"].requires_grad_(False)
        v_head = None
        if use_critic:
            if args.critic_init == "rm":  # the critic starts as the reward model: its adapter, its head
                reward = base.lora_configs["reward"]
                add_lora(base, reward["r"], reward["alpha"], args.lora_dropout, reward["targets"],
                         reward["exclude"], adapter="critic")
                for layer in (m for m in base.modules() if isinstance(m, LoRALinear)):
                    with torch.no_grad():
                        layer.lora_A["critic"].weight.copy_(layer.lora_A["reward"].weight)
                        layer.lora_B["critic"].weight.copy_(layer.lora_B["reward"].weight)
            else:
                add_lora(base, adapter="critic", **lora_kwargs)
            roles["critic"] = (base, "critic")
            v_head = _value_head(score, args.critic_init, device)
        add_lora(base, adapter="policy", **lora_kwargs)
        m = PPOModels(roles, v_head, _reward_head(score, bias, device), lora, "one base", sft_path)
    else:  # ---- a merged reward model: two bases (LoRA), or four models (full)
        policy = load(args.sft, AutoModelForCausalLM).eval()
        roles = {"policy": (policy, None)}
        if lora:
            add_lora(policy, **lora_kwargs)
            roles["reference"] = (policy, OFF)
        else:
            roles["reference"] = (_frozen(load(args.sft, AutoModelForCausalLM)), None)
        reward_model = load(args.rm, AutoModelForSequenceClassification, num_labels=1)
        score = reward_model.score.weight.detach()
        v_head = None
        if use_critic:
            if lora:
                critic = reward_model.eval()
                add_lora(critic, exclude=["score"], **lora_kwargs)  # freezes the base and the score head
                roles["reward"] = (reward_model, OFF)
            else:
                critic = load(args.rm, AutoModelForSequenceClassification, num_labels=1).eval()
                critic.score.requires_grad_(False)
                roles["reward"] = (_frozen(reward_model), None)
            roles["critic"] = (critic, None)
            v_head = _value_head(score, args.critic_init, device)
        else:
            roles["reward"] = (_frozen(reward_model), None)
        bias = getattr(reward_model.config, SCORE_BIAS, 0.0)
        plan = "two bases" if lora else "four models"
        m = PPOModels(roles, v_head, _reward_head(score, bias, device), lora, plan, sft_path)
    if args.gradient_checkpointing:
        for model in {id(m.policy): m.policy, id(m.critic): m.critic}.values():
            if model is not None:
                enable_gradient_checkpointing(model)
    return m


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer in backward instead of keeping its activations.

    transformers checkpoints a layer only while that layer is in training mode, and PPO keeps every
    module in eval mode (no dropout: the training forward must give the rollout's log-probs). So only
    the decoder layers themselves are flagged as training, not their children: dropout stays off, and
    without gradients (rollout, scoring) a layer runs as usual, KV cache included."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True  # this module alone: its attention and MLP stay in eval mode


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
    m.load(path)
    state = tu.load_trainer_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    tu.restore_rng(state)
    tu.info(f"resumed from {path} (iteration {state['step']})")
    return state["step"]
