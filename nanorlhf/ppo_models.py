"""PPO's models: which weights serve the policy, the reference, the reward model and the critic.

The memory plans for one GPU (LoRA, the default), by what --rm is:
  - an RM adapter trained on the SFT model (train_rm.py's LoRA output): ONE frozen base for all four
        policy    = base + the "policy" adapter          reference = the base, adapters off
        reward    = base + the "reward" adapter + the RM's score head
        critic    = base + its own "critic" adapter (from the reward adapter, or fresh) + a value head
  - a merged reward model: two bases
        policy    = SFT model + LoRA                     reference = the same weights, adapters off
        critic    = RM backbone + its own LoRA + a value head
        reward    = the same RM weights, adapters off, read through the RM's score head
  - no reward model (--reward_fn alone), or one with a tokenizer of its own: the critic cannot read
    the policy's ids through the RM, so it lives on the SFT base
        policy    = base + the "policy" adapter          reference = the base, adapters off
        critic    = base + a "critic" adapter + a fresh value head
        reward    = the reward model apart, fed its own tokenizer's ids (or none)
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

from nanorlhf.checkpoint import load_weights, save_model
from nanorlhf.errors import UserError
from nanorlhf.loading import check_model_dir, load_model, load_tokenizer
from nanorlhf.metrics import info
from nanorlhf.lora import (LoRALinear, active_adapter, add_lora, disable_adapters, load_adapter, read_adapter_tensors,
                           use_adapter)
from nanorlhf.rm import CONFIG_FILE, SCORE_BIAS

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
    reward_head: nn.Module | None  # the reward model's score head (its bias: --normalize_scores' offset)
    lora: bool
    plan: str  # "one base" | "two bases" | "four models" | ..., for the log
    sft_path: str = ""
    rm_tokenizer: object = None  # a reward model's own tokenizer (None: it reads the policy's token ids)

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
        """`with models.role("reward") as model:` the model of a role, in that role's adapter state."""
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
        save_model(policy, tokenizer, out_dir, self.lora, self.sft_path, adapter=adapter)
        if "critic" in self.roles:
            critic, adapter = self._trained("critic")
            critic_dir = os.path.join(out_dir, "critic")
            save_model(critic, None, critic_dir, self.lora, task_type="SEQ_CLS", adapter=adapter)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()},
                      os.path.join(critic_dir, "value_head.safetensors"))

    def load(self, checkpoint_dir):
        """The weights save() wrote, back into these models (resume)."""
        policy, adapter = self._trained("policy")
        load_weights(policy, checkpoint_dir, self.lora, adapter)
        if "critic" in self.roles:
            critic, adapter = self._trained("critic")
            critic_dir = os.path.join(checkpoint_dir, "critic")
            load_weights(critic, critic_dir, self.lora, adapter)
            head = load_file(os.path.join(critic_dir, "value_head.safetensors"))
            self.v_head.load_state_dict({k: v.to(self.v_head.weight.device) for k, v in head.items()})


def base_copies(models):
    """How many copies of the base weights the plan holds (the log says it)."""
    return len({id(model) for model, _ in models.roles.values()})


def describe_plan(models, dtype):
    copies = base_copies(models)
    return f"{models.plan} ({copies} cop{'y' if copies == 1 else 'ies'} of the base weights, {dtype} frozen weights)"


def _frozen(model):
    model.requires_grad_(False)
    return model.eval()


def is_adapter_dir(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _value_head(hidden, device, score_weight=None):
    """A value head [d] -> 1 with a bias, from the reward head's weight (critic_init "rm") or fresh."""
    v_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        if score_weight is not None:  # start the value head where the reward head is
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
    if not (base and os.path.exists(base) and os.path.samefile(base, args.sft)):  # a dir or a .gguf file
        raise UserError(f"--rm {args.rm}: the adapter was trained on {base or 'an unknown base'}, not on --sft "
                        f"{args.sft}; train the reward model on the SFT model, or pass a merged reward model")
    if args.finetuning_type != "lora":
        raise UserError("--rm as an adapter shares the SFT model's frozen weights: it needs --finetuning_type lora "
                        "(or merge it with merge_lora.py)")


def _critic_on_sft(args, load, lora, lora_kwargs, use_critic, device, rm_tokenizer):
    """The plan without a reward model that reads the policy's ids: the critic is an adapter on the SFT
    model (LoRA) or a copy of it (full), with a fresh value head; the reward model, if any, stands apart."""
    policy = load(args.sft, AutoModelForCausalLM).eval()
    roles, v_head = {}, None
    if use_critic:
        if lora:
            add_lora(policy, adapter="critic", **lora_kwargs)
            roles["critic"] = (policy, "critic")
        else:
            critic = load(args.sft, AutoModelForSequenceClassification, num_labels=1).eval()
            critic.score.requires_grad_(False)  # unused: the value head reads the backbone
            roles["critic"] = (critic, None)
        v_head = _value_head(policy.config.hidden_size, device)
        if args.critic_init == "rm":
            info("--critic_init rm: the critic cannot start as the reward model here; its value head starts fresh")
    if lora:
        add_lora(policy, adapter="policy", **lora_kwargs)
        roles.update(policy=(policy, "policy"), reference=(policy, OFF))
    else:
        roles.update(policy=(policy, None), reference=(_frozen(load(args.sft, AutoModelForCausalLM)), None))
    reward_head = None
    if args.rm:
        reward_model = _frozen(load_model(args.rm, AutoModelForSequenceClassification, device, policy.dtype,
                                          args.trust_remote_code, tokenizer=rm_tokenizer, num_labels=1))
        roles["reward"] = (reward_model, None)
        reward_head = _reward_head(reward_model.score.weight.detach(), getattr(reward_model.config, SCORE_BIAS, 0.0),
                                   device)
    bases = len({id(model) for model, _ in roles.values()})
    plan = ", ".join(["one base" if bases == 1 else f"{bases} models",
                      "the critic on the SFT model" if use_critic else "no critic",
                      "the reward model apart with its own tokenizer" if args.rm else "no reward model"])
    return PPOModels(roles, v_head, reward_head, lora, plan, os.path.abspath(args.sft), rm_tokenizer)


def build_models(args, device, dtype, use_critic, tokenizer, rm_tokenizer=None):
    """Load and wire the models for PPO. Every model stays in eval mode: dropout would make the
    log-probs of the training forward differ from the rollout's (N+ implementation details).
    rm_tokenizer: the reward model's own tokenizer when it does not read the policy's token ids."""
    lora = args.finetuning_type == "lora"
    lora_kwargs = dict(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_target)
    load = lambda path, cls, **kw: load_model(path, cls, device, dtype, args.trust_remote_code,  # noqa: E731
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
        for layer in (module for module in base.modules() if isinstance(module, LoRALinear)):
            layer.lora_A["reward"].requires_grad_(False)  # read, never trained
            layer.lora_B["reward"].requires_grad_(False)
        v_head = None
        if use_critic:
            if args.critic_init == "rm":  # the critic starts as the reward model: its adapter, its head
                reward = base.lora_configs["reward"]
                add_lora(base, reward["r"], reward["alpha"], args.lora_dropout, reward["targets"],
                         reward["exclude"], adapter="critic")
                for layer in (module for module in base.modules() if isinstance(module, LoRALinear)):
                    with torch.no_grad():
                        layer.lora_A["critic"].weight.copy_(layer.lora_A["reward"].weight)
                        layer.lora_B["critic"].weight.copy_(layer.lora_B["reward"].weight)
            else:
                add_lora(base, adapter="critic", **lora_kwargs)
            roles["critic"] = (base, "critic")
            v_head = _value_head(score.size(1), device, score if args.critic_init == "rm" else None)
        add_lora(base, adapter="policy", **lora_kwargs)
        models = PPOModels(roles, v_head, _reward_head(score, bias, device), lora, "one base", sft_path)
    elif not args.rm or rm_tokenizer is not None:  # ---- the critic on the SFT base; the reward model apart
        models = _critic_on_sft(args, load, lora, lora_kwargs, use_critic, device, rm_tokenizer)
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
            v_head = _value_head(score.size(1), device, score if args.critic_init == "rm" else None)
        else:
            roles["reward"] = (_frozen(reward_model), None)
        bias = getattr(reward_model.config, SCORE_BIAS, 0.0)
        plan = "two bases" if lora else "four models"
        models = PPOModels(roles, v_head, _reward_head(score, bias, device), lora, plan, sft_path)
    max_positions = getattr(models.policy.config, "max_position_embeddings", None)
    if max_positions and args.max_length + args.response_length > max_positions:
        raise UserError(f"--max_length {args.max_length} + --response_length {args.response_length} exceeds "
                        f"the model's {max_positions} positions ({args.sft})")
    if args.gradient_checkpointing:
        for model in {id(models.policy): models.policy, id(models.critic): models.critic}.values():
            if model is not None:
                enable_gradient_checkpointing(model)
    return models


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


def load_tokenizers(args):
    """(the policy's tokenizer, the reward model's own tokenizer or None). None: the reward model reads the
    policy's token ids, which needs the same tokenizer; with --rm_tokenizer_mismatch retokenize it scores
    the decoded text re-rendered with its own tokenizer and chat template instead."""
    check_model_dir(args.sft, "--sft")
    tokenizer = load_tokenizer(args.sft, args.trust_remote_code)
    if not args.rm:
        return tokenizer, None
    if is_adapter_dir(args.rm):  # an RM adapter (train_rm.py's LoRA output) shares --sft's base and tokenizer
        if args.rm_tokenizer_mismatch == "retokenize":
            raise UserError(f"--rm {args.rm} is an adapter on --sft: it reads the policy's token ids; "
                            "--rm_tokenizer_mismatch retokenize needs a merged reward model")
        differs = tokenizer_difference(tokenizer, load_tokenizer(args.rm, args.trust_remote_code))
        if differs:
            raise UserError(f"--sft {args.sft} and --rm {args.rm} have different tokenizers ({differs})")
        return tokenizer, None
    check_model_dir(args.rm, "--rm")
    rm_tokenizer = load_tokenizer(args.rm, args.trust_remote_code)
    differs = tokenizer_difference(tokenizer, rm_tokenizer)
    if args.rm_tokenizer_mismatch == "retokenize":
        info(f"--rm_tokenizer_mismatch retokenize: the reward model scores each prompt and response as text, "
             f"re-rendered with its own chat template and tokenizer ({differs or 'the same tokenizer as --sft'})")
        return tokenizer, rm_tokenizer
    if differs:
        raise UserError(f"--sft {args.sft} and --rm {args.rm} have different tokenizers ({differs}): train the "
                        "reward model from the SFT model, or pass --rm_tokenizer_mismatch retokenize")
    return tokenizer, None


def tokenizer_difference(policy_tok, rm_tok):
    """Why the reward model cannot read the policy's token ids (one phrase), or "" when it can."""
    a, b = policy_tok.get_vocab(), rm_tok.get_vocab()
    if a != b:
        tokens_a, tokens_b = ({i: t for t, i in vocab.items()} for vocab in (a, b))
        i = min(i for i in tokens_a.keys() | tokens_b.keys() if tokens_a.get(i) != tokens_b.get(i))
        return f"{len(a)} vs {len(b)} tokens; id {i} is {tokens_a.get(i)!r} vs {tokens_b.get(i)!r}"
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(policy_tok, name) != getattr(rm_tok, name):
            return f"they disagree on {name}"
    return ""
