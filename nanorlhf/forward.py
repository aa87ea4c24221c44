"""The forward passes PPO needs on a rollout batch (see nanorlhf.sampling for its layout): the
policy's logits and log-probs (steps 3 and 7), the critic's values (steps 4 and 7), the reward
model's score (step 2, through rm.score, the one scorer), and `PolicyAndValue`, what PPO trains.

Every function takes the batch dict and reads query, query_mask, response, response_mask from it.
`position_ids` count real tokens only, so a left-padded prompt sees the same positions as the same
prompt alone.
"""

import torch
from torch import nn

from nanorlhf.data import encode_answer, pad_with_mask
from nanorlhf.ppo import logprobs_from_logits
from nanorlhf.rm import backbone, score

QUERY_KEYS = ("query", "query_mask")  # [B, P]; every other [B, x] tensor of a batch is [B, R]


def position_ids_from(attention_mask):
    """0, 1, 2... over real tokens; padding gets 0 (it is masked out anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sequences(batch):
    """input_ids, attention_mask and position_ids of the sequences query + response."""
    input_ids = torch.cat([batch["query"], batch["response"]], 1)
    attention_mask = torch.cat([batch["query_mask"], batch["response_mask"].long()], 1)
    return input_ids, attention_mask, position_ids_from(attention_mask)


def trim_padding(batch):
    """The batch without the columns that are padding in every row: the left padding all the prompts
    share and the right padding after the longest response.

    Exact, not an approximation: position ids are counted over real tokens, padded keys are masked
    out of attention, and causal attention means no kept position ever looked at a dropped column.
    A PPO minibatch is a random subset of the batch, so it is often shorter than the batch; this
    is what the update's forward and backward then skip (length-aware batching without reordering).
    """
    query_mask = batch["query_mask"]
    first = query_mask.size(1) - int(query_mask.bool().any(0).sum())  # left padding: used columns are a suffix
    R = max(1, int((batch["response_mask"] > 0).any(0).sum()))  # right padding after EOS: a prefix is used
    return {k: v[:, first:] if k in QUERY_KEYS else v[:, :R] if v.dim() == 2 else v for k, v in batch.items()}


def policy_logits(model, batch, temperature=1.0):
    """Logits [B, R, V] the policy gives each response token (logit at t-1 predicts token t),
    divided by the sampling temperature so log-probs match the rollout's (N+ details, #3)."""
    input_ids, attention_mask, position_ids = sequences(batch)
    # Only the logits that predict response tokens: with a 150k vocabulary the prompt's logits
    # would be most of the activation memory.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=batch["response"].size(1) + 1).logits[:, :-1]
    return logits / temperature if temperature > 0 else logits


def logprobs_of(model, batch, temperature=1.0):
    """Log-probs [B, R] of the response tokens under `model` (the reference policy's, step 3)."""
    return logprobs_from_logits(policy_logits(model, batch, temperature), batch["response"])


def critic_values(seq_model, v_head, batch):
    """V(s_t) [B, R]: the value of the state before each response token (read at column t-1)."""
    input_ids, attention_mask, position_ids = sequences(batch)
    hidden = backbone(seq_model)(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state  # [B, P+R, d]
    P = batch["query"].size(1)
    return v_head(hidden[:, P - 1:-1].to(v_head.weight.dtype)).squeeze(-1).float()


def reward_scores(seq_model, batch, head=None):
    """The reward model's score [B] of each query + response, read at its last real token (rm.score)."""
    return score(seq_model, *sequences(batch), head)


def reward_scores_of_texts(seq_model, tokenizer, prompts, responses, head=None):
    """The score [B] a reward model with a tokenizer of its own gives each (prompt messages, response text):
    the dialogue re-rendered with its chat template and tokenizer (data.encode_answer), as it was trained."""
    input_ids, attention_mask = pad_with_mask([encode_answer(tokenizer, messages, response)
                                               for messages, response in zip(prompts, responses)],
                                              tokenizer.pad_token_id)
    device = next(seq_model.parameters()).device
    return score(seq_model, input_ids.to(device), attention_mask.to(device), head=head)


class PolicyAndValue(nn.Module):
    """What PPO trains, as one module: forward(batch) -> (logits [B, R, V] of the policy,
    temperature-scaled; values [B, R] of the critic, or None without one).

    One module so that one DistributedDataParallel wraps both: DDP syncs the gradients of what runs
    through the forward of the module it wraps, and the critic's values come from its backbone, not
    its forward (TRL's PolicyAndValueWrapper is the same idea). Rollout and scoring use the modules
    themselves, without gradients. On one shared base, each pass runs with its own adapter."""

    def __init__(self, models, temperature):
        super().__init__()
        self.models, self.temperature = models, temperature  # nanorlhf.ppo_models.PPOModels: the roles
        self.policy, self.critic, self.v_head = models.policy, models.critic, models.v_head  # registered for DDP

    def forward(self, batch):
        with self.models.role("policy") as policy:
            logits = policy_logits(policy, batch, self.temperature)
        if self.critic is None:
            return logits, None
        with self.models.role("critic") as critic:
            return logits, critic_values(critic, self.v_head, batch)
