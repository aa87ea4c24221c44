"""The reward model: a scalar score for a (prompt, answer) sequence, trained on preference pairs.

The model is transformers' own `AutoModelForSequenceClassification` with num_labels=1: the causal
LM's backbone (`model.model` for Llama/Qwen) plus a linear head `model.score` [1, d] without bias.
The score of a sequence is the head applied to the hidden state of its last real token, which is
the end-of-turn token that closes the answer (`<|im_end|>`, `<|eot_id|>`...; see nanorlhf.template)
(Ouyang et al. 2022, InstructGPT, section 3.5; Stiennon et al. 2020).
Saved that way, a reward model loads with `AutoModelForSequenceClassification.from_pretrained(dir)`
and gives the same scores as `score` below (plus the stored bias, see SCORE_BIAS).

Chosen and rejected answers are scored in one forward over the 2B sequences: one pass instead of
two, with the same weights for both halves of every pair.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanorlhf.data import pad_with_mask
from nanorlhf.errors import UserError

# transformers' `score` Linear has no bias. --normalize_scores folds 1/std into score.weight and
# stores the offset -mean/std here, in config.json; `score` adds it. transformers does not know
# this field: a user of AutoModelForSequenceClassification adds `model.config.nanorlhf_score_bias`
# to the logits themselves to get the normalised score.
SCORE_BIAS = "nanorlhf_score_bias"
# A LoRA run has no config.json of its own: it writes SCORE_BIAS to this file beside the adapter,
# and merge_lora.py copies it into the merged model's config.json.
CONFIG_FILE = "nanorlhf_config.json"


def pairwise_loss(chosen_scores, rejected_scores, margin=None):
    """Bradley-Terry loss of preference pairs: mean of -log sigmoid(r_chosen - r_rejected - margin).

    chosen_scores, rejected_scores: [B]; margin: [B], a float, or None (= 0). Returns a scalar.
    InstructGPT eq. 1 (Ouyang et al. 2022); the margin, how much better the chosen answer is
    rated, is Llama 2's (Touvron et al. 2023, eq. 2): a pair rated far apart must be scored apart.
    """
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def last_token_index(attention_mask):
    """[B, T] mask (1 = real token) -> [B] position of each row's last real token.

    Read from the mask, not from pad ids, so it is right for left and right padding alike (and
    for a pad id that happens to equal a real token). argmax of position * mask picks the largest
    real position.
    """
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def backbone(model):
    """The transformer body under the head (`model.model` for Llama, Qwen2, Mistral, ...)."""
    return getattr(model, model.base_model_prefix)


def score(model, input_ids, attention_mask, position_ids=None, head=None):
    """Reward of each sequence: [B, T] ids and mask -> [B] float32 scores. The one scorer: the RM
    stage, PPO's reward and evaluate all read the reward model through it.

    Runs the backbone, takes the hidden state at the last real token and applies the head,
    then adds the bias --normalize_scores stored in the config (0 when there is none).
    position_ids: for left-padded rows (PPO's query + response), positions that count real tokens.
    head: a float32 score head with the offset as its bias (PPO's), instead of model.score + the config's.
    """
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids).last_hidden_state  # [B, T, d]
    rows = torch.arange(hidden.size(0), device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]  # [B, d]
    if head is not None:
        return head(last.to(head.weight.dtype)).squeeze(-1).float()
    return model.score(last).squeeze(-1).float() + getattr(model.config, SCORE_BIAS, 0.0)


def collate_pairs(pairs, pad_id):
    """[(chosen_ids, rejected_ids, margin)] -> dict of input_ids and attention_mask [2B, T]
    (the B chosen sequences, then the B rejected ones, right-padded) and margin [B]."""
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    input_ids, attention_mask = pad_with_mask(sequences, pad_id)
    margin = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}


class Scorer(nn.Module):
    """`score` as the forward of a module: forward(input_ids, attention_mask) -> [B] scores. Under
    torchrun, DistributedDataParallel syncs the gradients of what runs through the forward of the
    module it wraps, and `score` calls the backbone and the head, not the model's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return score(self.model, input_ids, attention_mask)


def score_pairs(model, batch):
    """Score chosen and rejected in ONE forward over the 2B sequences -> (chosen [B], rejected [B])."""
    scores = score(model, batch["input_ids"], batch["attention_mask"])
    return scores.chunk(2)


def pair_stats(chosen_scores, rejected_scores):
    """What tells a healthy reward model from a sick one: how often chosen wins, and by how much."""
    return {"accuracy": (chosen_scores > rejected_scores).float().mean().item(),
            "chosen_score": chosen_scores.mean().item(), "rejected_score": rejected_scores.mean().item(),
            "margin": (chosen_scores - rejected_scores).mean().item()}


def init_head(model):
    """score.weight ~ N(0, 1 / sqrt(d + 1)): the reward head starts with scores of about unit size.

    From OpenAI's lm-human-preferences, as described by Huang et al. 2024, "The N Implementation
    Details of RLHF with PPO" (reward model detail: the head's initialisation).
    """
    d = model.score.weight.size(1)
    with torch.no_grad():
        model.score.weight.normal_(mean=0.0, std=1.0 / math.sqrt(d + 1))


def normalize_head(model, scores):
    """Make `scores` (of the model as it is) mean 0, std 1: s' = (s - mean) / std.

    Since s = w . h + b, s' = (w / std) . h + (b - mean) / std: the gain goes into score.weight,
    so transformers gives the scaled score too; the offset goes to config.json as SCORE_BIAS.
    Returns (mean, std) of the scores before.
    """
    mean, std = scores.mean().item(), scores.std().item()
    if not std > 1e-8:
        raise UserError(f"--normalize_scores: the scores have std {std:g}; cannot normalise them")
    with torch.no_grad():
        model.score.weight.div_(std)
    setattr(model.config, SCORE_BIAS, (getattr(model.config, SCORE_BIAS, 0.0) - mean) / std)
    return mean, std


def load_reward_model(path, device, dtype, trust_remote_code=False):
    """A reward model dir (a full RM run or merge_lora.py's output) -> (model, tokenizer), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from nanorlhf.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_model(path, AutoModelForSequenceClassification, device, dtype,
                          trust_remote_code=trust_remote_code, tokenizer=tokenizer, num_labels=1)
    return model.eval(), tokenizer
