"""Sampling responses with a KV cache: PPO's rollout (step 1), evaluate and chat.

A rollout batch is one dict of tensors, indexed by rows ([B, ...]) as a whole:
    query          [B, P] long   the prompts, left-padded: every prompt ends at column P-1
    query_mask     [B, P] long   1 on prompt tokens, 0 on the left padding (an attention mask)
    response       [B, R] long   the sampled tokens, pad_id after each sequence's first EOS
    response_mask  [B, R] float  1.0 on response tokens up to and including the first EOS, 0.0 after
    logprobs       [B, R] float  log-prob of each sampled token (0 at padding)
PPO adds its own [B, R] tensors (ref_logprobs, values, advantages, returns) and [B] ones (scores).
"""

import torch
from transformers import DynamicCache

from nanorlhf.data import pad_with_mask
from nanorlhf.forward import position_ids_from


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
    the KV cache; stop early once every sequence has produced an EOS (any of eos_ids).

    Returns the rollout batch (see the module docstring): query, query_mask, response (R <=
    max_new_tokens), response_mask, and logprobs of the sampled tokens under the temperature-scaled
    distribution: the same numbers the training forward recomputes, so PPO reuses them as old log-probs.
    """
    device = next(model.parameters()).device
    query, query_mask = (t.to(device) for t in pad_with_mask(prompts, pad_id, side="left"))
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    input_ids, attention_mask, position_ids = query, query_mask, position_ids_from(query_mask)
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
    response = torch.stack(tokens, 1)
    return {"query": query, "query_mask": query_mask, "response": response,
            "response_mask": response_mask(response, eos_ids), "logprobs": torch.stack(logprobs, 1)}


def decode_responses(tokenizer, batch):
    """The text of each response of a batch, without its end-of-turn token or padding: [B] strings."""
    return [tokenizer.decode(row[row_mask > 0], skip_special_tokens=True).strip()
            for row, row_mask in zip(batch["response"], batch["response_mask"])]


def response_mask(response, eos_ids):
    """1.0 on real response tokens (up to and including the first EOS), 0.0 after it."""
    is_eos = torch.isin(response, torch.tensor(sorted(set(eos_ids)), device=response.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float()


def ended_with_eos(response, eos_ids):
    """[B] bool: did the response produce an EOS (False = cut off at --response_length)."""
    return torch.isin(response, torch.tensor(sorted(set(eos_ids)), device=response.device)).any(1)


