"""LoRA written by hand, saved and loaded in PEFT's on-disk format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W [out, in] and learns a low-rank update of it instead (eq. 3):

    y = W x + (alpha / r) * B A x        A: [r, in], B: [out, r], r << min(in, out)

B starts at zero, so training starts exactly from the pretrained model. Dividing by r (section 4.1)
keeps the size of the update about the same when r changes, so r can be tuned without retuning
the learning rate. Only A and B are trained: a few MB of optimizer state instead of the whole model.

The attribute names (`base_layer`, `lora_A`, `lora_B`) are PEFT's. With them the path of every
LoRA weight in our model is PEFT's key without the "base_model.model." prefix, so writing and
reading PEFT's format (adapter_config.json + adapter_model.safetensors) is a rename.
"""

import contextlib
import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanorlhf.errors import UserError
from nanorlhf.files import atomic_write, atomic_write_text

# A PeftModel holds a LoraModel as `.base_model`, which holds the transformers model as `.model`.
PEFT_PREFIX = "base_model.model."
# Output heads are trained whole (reward/value heads) or not at all (lm_head): "all" never adapts them.
OUTPUT_HEADS = ["lm_head", "score", "v_head"]
# The adapter_config.json fields that describe plain LoRA as written here (PEFT's variants differ).
PLAIN_LORA = {
    "bias": "none", "lora_bias": False, "use_dora": False,
    "use_rslora": False,  # scaling is alpha / r, not alpha / sqrt(r)
    "fan_in_fan_out": False,  # weights are [out, in], as in nn.Linear
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,  # one r and alpha everywhere
}


class LoRALinear(nn.Module):
    """y = base_layer(x) + (alpha / r) * lora_B[a](lora_A[a](dropout(x))), base_layer frozen.

    A layer holds several named adapters (PEFT's multi-adapter idea) and applies the active one,
    `a`: PPO keeps ONE frozen base and switches between the policy's, the reward model's and the
    critic's adapters on it. A single-adapter model has just "default". The adapters are float32
    even over a bf16/fp16 base (as PEFT does): their updates and optimizer state stay precise while
    the frozen weights take half the memory.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, adapter="default"):
        super().__init__()
        mode = base_layer.training
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r, self.alpha, self.scaling = {}, {}, {}
        self.active = adapter  # the adapter forward applies
        self.disabled = False  # True: behave exactly like the base layer (see disable_adapters)
        self.add_adapter(adapter, r, alpha, dropout)
        self.train(mode)  # a model in eval mode stays in eval mode: no dropout appears

    def add_adapter(self, name, r, alpha, dropout=0.0):
        dtype = self.base_layer.weight.dtype
        where = dict(bias=False, device=self.base_layer.weight.device,
                     dtype=torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
        self.lora_A[name] = nn.Linear(self.base_layer.in_features, r, **where)
        self.lora_B[name] = nn.Linear(r, self.base_layer.out_features, **where)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        # A random and B zero makes B A = 0 at the start; PEFT uses the same kaiming init for A.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        for module in (self.lora_A[name], self.lora_B[name], self.lora_dropout[name]):
            module.train(self.training)  # the new modules take the layer's mode

    def forward(self, x):
        y = self.base_layer(x)
        if self.disabled or self.active not in self.lora_A:  # adapters may wrap different layers
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        # Scaling the r-wide activations instead of the out-wide result: the same sum, and one
        # elementwise pass over r (8-64) columns instead of out (thousands), forward and backward.
        h = A(self.lora_dropout[self.active](x).to(A.weight.dtype)) * self.scaling[self.active]
        return y + B(h).to(y.dtype)

    def extra_repr(self):
        return ", ".join(f"{n}: r={self.r[n]}, alpha={self.alpha[n]}" for n in self.r) + f"; active={self.active}"


def _matches(name, suffixes):
    """PEFT's rule: a module matches a name if its path is that name or ends with "." + name."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _linear_names(model):
    """The last part of the name of every nn.Linear layer: what LoRA targets can name."""
    return ", ".join(sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}))


def _lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace(model, name, new_module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new_module)


def add_lora(model, r=8, alpha=16, dropout=0.0, targets="all", exclude=(), adapter="default"):
    """Wrap the matching nn.Linear layers of `model` in LoRALinear, in place, and freeze the rest.

    targets: "all" (every nn.Linear but the output heads lm_head/score/v_head), or module-name
    suffixes as a list or a comma-separated string ("q_proj,v_proj"). exclude: names never wrapped.
    Every non-LoRA parameter is frozen afterwards; unfreeze a head yourself if you train it.
    Targets that match no layer are a UserError (they come from the user's --lora_target).
    On a model that has LoRA layers already, adds another named `adapter` (to the layers it targets;
    a layer without the active adapter computes its base alone) and makes it the active one; the
    other adapters keep their trainable flags.
    """
    configs = getattr(model, "lora_configs", {})
    if adapter in configs:
        raise ValueError(f"add_lora: the model already has an adapter named {adapter!r}")
    if isinstance(targets, str) and targets != "all":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    exclude = list(exclude or [])
    existing = _lora_layers(model)
    names = [
        name for name, module in model.named_modules()
        if name and isinstance(module, (nn.Linear, LoRALinear)) and ".base_layer" not in name + "."
        and ".lora_" not in name and not _matches(name, exclude)
        and (not _matches(name, OUTPUT_HEADS) if targets == "all" else _matches(name, targets))
    ]
    if not names:
        given = targets if isinstance(targets, str) else ",".join(targets)
        raise UserError(f"--lora_target {given} matches no nn.Linear layer of {type(model).__name__}; "
                        f"its linear layers are named: {_linear_names(model) or 'none'}")
    if not existing:
        model.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter, r, alpha, dropout)
        else:
            _replace(model, name, LoRALinear(module, r, alpha, dropout, adapter))
    for _, layer in _lora_layers(model):
        layer.active = adapter
        if adapter in layer.lora_A:
            layer.lora_A[adapter].requires_grad_(True)
            layer.lora_B[adapter].requires_grad_(True)
    # What PEFT's target_modules must list to wrap the same layers: the names given, or for "all"
    # the last part of each wrapped path (exclusions are written too, as PEFT's exclude_modules).
    if targets == "all":
        matched = sorted({n.rpartition(".")[2] for n in names})
    else:
        matched = [t for t in targets if any(_matches(n, [t]) for n in names)]
    model.lora_configs = {**configs, adapter: dict(r=r, alpha=alpha, dropout=dropout, targets=matched,
                                                   exclude=exclude)}
    return model


def merge_lora(model, adapter=None):
    """Fold one adapter (the active one by default) into its weight (W <- W + (alpha/r) B A) and put
    the plain nn.Linear back; the model's other adapters are dropped.

    Afterwards the model is an ordinary transformers model (save_pretrained writes the usual keys).
    The merged weights stay frozen, as they were under LoRA.
    """
    for name, layer in _lora_layers(model):
        a = adapter or layer.active
        base = layer.base_layer
        if a in layer.lora_A:
            with torch.no_grad():  # B A in fp32, rounded once to the weight's dtype (bf16 on a GPU)
                delta = layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float()
                base.weight += (layer.scaling[a] * delta).to(base.weight.dtype)
        _replace(model, name, base)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def active_adapter(model):
    """The name of the adapter the model's LoRA layers apply (None without LoRA)."""
    layers = _lora_layers(model)
    return layers[0][1].active if layers else None


@contextlib.contextmanager
def _set_on_layers(model, attribute, value):
    """Set `attribute` on every LoRA layer inside the block; put back what each had after it."""
    layers = [layer for _, layer in _lora_layers(model)]
    previous = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield model
    finally:
        for layer, old in zip(layers, previous):
            setattr(layer, attribute, old)


def use_adapter(model, adapter):
    """Inside this block the model's LoRA layers apply `adapter` (e.g. PPO's "reward" on the shared base)."""
    return _set_on_layers(model, "active", adapter)


def lora_state_dict(model, adapter=None):
    """One adapter's A and B weights (the active one by default), under PEFT's saved key names
    ("<layer>.lora_A.weight": the adapter's name is not in the key, as in PEFT's files)."""
    state = {}
    for name, layer in _lora_layers(model):
        a = adapter or layer.active
        if a not in layer.lora_A:
            continue
        state[f"{name}.lora_A.weight"] = layer.lora_A[a].weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B[a].weight.detach()
    return state


def _modules_state_dict(model, module_names):
    """State of the plain modules named in modules_to_save (e.g. a trained "score" head)."""
    state = {}
    for name, module in model.named_modules():
        if name and _matches(name, module_names):
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def save_adapter(model, out_dir, base_model_name_or_path="", task_type="CAUSAL_LM", modules_to_save=None,
                 adapter=None, extra_tensors=None):
    """Write one adapter (the active one by default) as PEFT does, so
    `peft.PeftModel.from_pretrained(base, out_dir)` loads it.

    modules_to_save: plain modules trained whole and saved with the adapter (["score"] for a reward
    model's head); PEFT stores them under "base_model.model.<path>.<param>", like the base model.
    Defaults to the ones an adapter was loaded with; for task_type "SEQ_CLS" the head is always saved.
    extra_tensors: {key: tensor} written under "base_model.model.<key>" too (a head that lives
    outside the model, such as the reward head of PPO's shared base).
    """
    adapter = adapter or active_adapter(model)
    config = getattr(model, "lora_configs", {}).get(adapter)
    if config is None:
        raise ValueError(f"save_adapter: the model has no LoRA adapter {adapter!r} (call add_lora first)")
    modules_to_save = list(config.get("modules_to_save", []) if modules_to_save is None else modules_to_save)
    if task_type == "SEQ_CLS":  # PEFT always restores a classifier's head, and fails if the file lacks it
        modules_to_save += [n for n in ("classifier", "score")
                            if n not in modules_to_save and _modules_state_dict(model, [n])]
    tensors = {**lora_state_dict(model, adapter), **(extra_tensors or {})}
    for name in modules_to_save:
        module_state = _modules_state_dict(model, [name])
        if not module_state and not any(_matches(k.rpartition(".")[0], [name]) for k in extra_tensors or {}):
            raise ValueError(f"save_adapter: modules_to_save names {name!r}, which is no module of the model")
        tensors.update(module_state)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    peft_config = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or None,  # PEFT writes null when unknown
        "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": list(config["targets"]), "exclude_modules": list(config["exclude"]) or None,
        "modules_to_save": modules_to_save or None,
        **PLAIN_LORA, "inference_mode": True, "init_lora_weights": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    # Weights first, config last: a dir with a config always has its weights.
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                 lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(peft_config, indent=2) + "\n")


def load_adapter(model, adapter_dir, adapter="default"):
    """Load a PEFT LoRA adapter (ours or PEFT's own) into `model` as `adapter`, in place, and make it
    the active one; returns the model.

    Adds the LoRA layers (or this adapter to the existing ones) first if needed. Reads only JSON and
    safetensors. Strict: a weight the model needs that the file lacks, or one the model has no place
    for, is an error; a modules_to_save module the model does not have (a reward model's "score"
    loaded on a causal LM) is left for the caller (read_adapter_tensors).
    """
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"{adapter_dir}: not a LoRA adapter dir, {os.path.basename(path)} is missing")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{adapter_dir}: adapter_config.json must be a JSON object, "
                         f"got {type(config).__name__}")
    for field, value in {"peft_type": "LORA", **PLAIN_LORA}.items():
        if config.get(field, value) != value:
            raise ValueError(f"{adapter_dir}: adapter_config.json has {field}={config[field]!r}; nanorlhf "
                             f"loads plain LoRA adapters ({field}={value!r})")
    # PEFT's SEQ_CLS adds "classifier" and "score" for any model: keep the names this model has.
    listed = config.get("modules_to_save") or []
    modules_to_save = [n for n in listed if _modules_state_dict(model, [n])]
    configs = getattr(model, "lora_configs", {})
    if adapter not in configs:
        targets = config["target_modules"]
        if targets == "all-linear":
            targets = "all"
        exclude = config.get("exclude_modules") or []
        if isinstance(targets, str) or isinstance(exclude, str):
            raise ValueError(f"{adapter_dir}: target_modules or exclude_modules as a regex is not supported")
        exclude = exclude + modules_to_save  # PEFT never puts LoRA inside a module it saves whole
        try:
            add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                     targets=targets, exclude=exclude, adapter=adapter)
        except UserError:  # targets from the adapter's config, not from --lora_target
            raise ValueError(f"{adapter_dir}: target_modules {targets} match no nn.Linear layer of "
                             f"{type(model).__name__}; its linear layers are named: {_linear_names(model)}") from None
    elif (configs[adapter]["r"], configs[adapter]["alpha"]) != (config["r"], config["lora_alpha"]):
        ours = configs[adapter]
        raise ValueError(f"{adapter_dir}: adapter has r={config['r']}, lora_alpha={config['lora_alpha']}, "
                         f"the model's LoRA has r={ours['r']}, alpha={ours['alpha']}")
    model.lora_configs[adapter]["modules_to_save"] = modules_to_save
    for _, layer in _lora_layers(model):
        layer.active = adapter

    saved = load_file(weights_path)
    left_out = [n for n in listed if n not in modules_to_save]  # heads the model has no place for
    saved = {k: v for k, v in saved.items() if not _matches(k[len(PEFT_PREFIX):].rpartition(".")[0], left_out)}
    expected = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model, adapter).items()}
    expected.update({PEFT_PREFIX + k: v for k, v in _modules_state_dict(model, modules_to_save).items()})
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing:
        raise ValueError(f"{adapter_dir}: adapter_model.safetensors has no {missing[0]}, which the model "
                         f"needs ({len(missing)} missing keys)")
    if unexpected:
        raise ValueError(f"{adapter_dir}: adapter_model.safetensors has unexpected key {unexpected[0]}, "
                         f"which is no LoRA or modules_to_save weight of the model ({len(unexpected)} such)")
    with torch.no_grad():
        for key, target in expected.items():
            if saved[key].shape != target.shape:
                raise ValueError(f"{adapter_dir}: {key} has shape {tuple(saved[key].shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(saved[key])  # copy_ converts to the model's dtype and device
    return model


def read_adapter_tensors(adapter_dir, names):
    """{name.param: tensor} of the modules_to_save weights `names` (e.g. ["score"]) in an adapter file."""
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return {k[len(PEFT_PREFIX):]: v for k, v in saved.items()
            if k.startswith(PEFT_PREFIX) and _matches(k[len(PEFT_PREFIX):].rpartition(".")[0], names)}


def disable_adapters(model):
    """Inside this block the model computes its base weights alone (W x), e.g. PPO's reference policy."""
    return _set_on_layers(model, "disabled", True)


def count_parameters(model):
    """(trainable, total) number of parameters; tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
