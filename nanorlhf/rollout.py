"""Sampling responses with a KV cache, and the forward passes PPO needs on (query, response).

Layout used everywhere in PPO: `query` [B, P] is left-padded (so every prompt ends at column
P-1 and the responses start together at column P), `response` [B, R] is right-padded with
pad_id after each sequence's EOS. `position_ids` count real tokens only, so a left-padded
prompt sees the same positions as the same prompt alone.
"""

import torch
from transformers import DynamicCache

from nanorlhf.data import pad
from nanorlhf.ppo import logprobs_from_logits
from nanorlhf.rm import backbone, score


def position_ids_from(attention_mask):
    """0, 1, 2... over real tokens; padding gets 0 (it is masked out anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Sample one token per row from logits [B, V] (temperature, then top-k, then nucleus top-p)."""
    if temperature <= 0:  # greedy
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p (Holtzman et al. 2019)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Gumbel-max: argmax(logits + G), G ~ Gumbel(0, 1), is a sample of softmax(logits) (Gumbel 1954);
    # the same distribution as torch.multinomial, about 2x cheaper per call on a CPU.
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(min=1e-20)))
    return (logits + gumbel).argmax(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, eos_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0):
    """Sample a response for each prompt (a list of token id lists), one token at a time, reusing
    the KV cache; stop early once every sequence has produced an EOS.

    Returns query [B, P] (left-padded), query_mask [B, P], response [B, R] (pad after EOS,
    R <= max_new_tokens) and logprobs [B, R] of the sampled tokens under the temperature-scaled
    distribution (0 at padding): the same numbers the training forward recomputes, so PPO can
    reuse them as old log-probs.
    """
    device = next(model.parameters()).device
    query = pad(prompts, pad_id, side="left").to(device)
    attention_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
    position_ids = position_ids_from(attention_mask)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    query_mask, input_ids = attention_mask, query
    cache = DynamicCache(config=model.config)  # keys and values of every token so far, grown each step
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, use_cache=True, logits_to_keep=1)  # only the next token's logits
        logits = out.logits[:, -1].float()
        token = sample_token(logits, temperature, top_k, top_p)
        scaled = logits / temperature if temperature > 0 else logits
        logprob = torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None]).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)  # pad after EOS
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(logprob), logprob))
        finished |= torch.isin(token, eos)
        if finished.all():  # one sync per token, not per sequence: the loop needs to know when to stop
            break
        input_ids = token[:, None]
        # Finished rows keep sampling (their tokens are replaced by pad): rows never see each other.
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return query, query_mask, torch.stack(tokens, 1), torch.stack(logprobs, 1)


def response_mask(response, eos_ids, pad_id):
    """1.0 on real response tokens (up to and including the first EOS), 0.0 after it."""
    is_eos = torch.isin(response, torch.tensor(sorted(set(eos_ids)), device=response.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float()


def ended_with_eos(response, eos_ids):
    """[B] bool: did the response produce an EOS (False = cut off at --response_length)."""
    return torch.isin(response, torch.tensor(sorted(set(eos_ids)), device=response.device)).any(1)


def trim_padding(query, query_mask, response, mask):
    """Drop the columns that are padding in every row: the left-padding all the prompts share and the
    right-padding after the longest response. Returns (query, query_mask, response, mask, R) with
    R the response columns kept; slice every other [B, R] tensor as [:, :R].

    Exact, not an approximation: position ids are counted over real tokens, padded keys are masked
    out of attention, and causal attention means no kept position ever looked at a dropped column.
    A PPO minibatch is a random subset of the batch, so it is often shorter than the batch; this
    is what the update's forward and backward then skip (length-aware batching without reordering).
    """
    first = query_mask.size(1) - int(query_mask.bool().any(0).sum())  # left padding: used columns are a suffix
    R = max(1, int((mask > 0).any(0).sum()))  # right padding after EOS: used columns are a prefix
    return query[:, first:], query_mask[:, first:], response[:, :R], mask[:, :R], R


def concat(query, response, mask, query_mask):
    """input_ids, attention_mask and position_ids of the sequences query + response."""
    input_ids = torch.cat([query, response], 1)
    attention_mask = torch.cat([query_mask, mask.long()], 1)
    return input_ids, attention_mask, position_ids_from(attention_mask)


def policy_logits(model, query, response, mask, query_mask, temperature=1.0):
    """Logits [B, R, V] the policy gives each response token (logit at t-1 predicts token t),
    divided by the sampling temperature so log-probs match the rollout's (N+ details, #3)."""
    input_ids, attention_mask, position_ids = concat(query, response, mask, query_mask)
    # Only the logits that predict response tokens: with a 150k vocabulary the prompt's logits
    # would be most of the activation memory.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=response.size(1) + 1).logits[:, :-1]
    return logits / temperature if temperature > 0 else logits


def critic_values(seq_model, v_head, query, response, mask, query_mask):
    """V(s_t) [B, R]: the value of the state before each response token (read at column t-1)."""
    input_ids, attention_mask, position_ids = concat(query, response, mask, query_mask)
    hidden = backbone(seq_model)(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state  # [B, P+R, d]
    P = query.size(1)
    return v_head(hidden[:, P - 1:-1].to(v_head.weight.dtype)).squeeze(-1).float()


def reward_scores(seq_model, query, response, mask, query_mask, head=None):
    """The reward model's score [B] of each query + response, read at its last real token (rm.score)."""
    input_ids, attention_mask, position_ids = concat(query, response, mask, query_mask)
    return score(seq_model, input_ids, attention_mask, position_ids, head)


def logprobs_of(model, query, response, mask, query_mask, temperature=1.0):
    """Log-probs [B, R] of the response tokens under `model` (used for the reference policy)."""
    return logprobs_from_logits(policy_logits(model, query, response, mask, query_mask, temperature), response)
