"""Sampling with a KV cache (nanorlhf.sampling) and the forward passes on its batches (nanorlhf.forward):
left padding, EOS handling, log-probs that training reproduces, trimming padding exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanorlhf.ppo import logprobs_from_logits
from nanorlhf.forward import policy_logits, position_ids_from, trim_padding
from nanorlhf.sampling import ended_with_eos, generate, response_mask, sample_token


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


TEXTS = ["The common cold causes", "偏头痛", "If you have a runny nose, a sore throat and a mild cough, it"]


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_response_mask_cases():
    eos = 3
    response = torch.tensor([[5, 6, 7, 8],    # no EOS: full length
                             [3, 0, 0, 0],    # EOS as the first token
                             [5, 3, 0, 0],    # EOS in the middle
                             [5, 6, 7, 3]])   # EOS as the last token
    assert response_mask(response, [eos]).tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended_with_eos(response, [eos]).tolist() == [False, True, True, True]


def test_greedy_kv_cache_equals_transformers_generate(lm):
    model, tok = lm
    prompt = prompts_of(tok, TEXTS[:1])
    response = generate(model, prompt, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)["response"]
    expected = model.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt[0]):]
    n = len(expected)
    assert response[0, :n].tolist() == expected.tolist()


def test_left_padded_prompt_generates_as_if_alone(lm):
    model, tok = lm
    prompts = prompts_of(tok, TEXTS)
    together = generate(model, prompts, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)["response"]
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)["response"]
        assert together[i, :alone.size(1)].tolist() == alone[0].tolist()


def test_tokens_after_eos_are_padding(lm):
    model, tok = lm
    torch.manual_seed(1)
    # a hot temperature on a barely trained model: some rows end early, some run to the limit
    batch = generate(model, prompts_of(tok, TEXTS) * 4, 16, [tok.eos_token_id], tok.pad_token_id, temperature=1.5)
    response, mask = batch["response"], batch["response_mask"]
    assert (mask == response_mask(response, [tok.eos_token_id])).all()
    assert ((response == tok.pad_token_id) | (mask > 0)).all()  # every padded slot holds pad
    assert (batch["logprobs"][mask == 0] == 0).all()
    assert 0 < (mask == 0).sum() < mask.numel()  # the case was there: some rows ended early, some did not


def test_stops_early_when_every_sequence_ended(lm):
    model, tok = lm
    response = generate(model, prompts_of(tok, TEXTS[:1]), 20, list(range(len(tok))), tok.pad_token_id)["response"]
    assert response.shape == (1, 1)  # every token counts as an end here: one step, then stop


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_training_forward(lm, temperature):
    model, tok = lm
    torch.manual_seed(0)
    batch = generate(model, prompts_of(tok, TEXTS), 16, [tok.eos_token_id], tok.pad_token_id, temperature=temperature)
    mask, logprobs = batch["response_mask"], batch["logprobs"]
    with torch.no_grad():
        recomputed = logprobs_from_logits(policy_logits(model, batch, temperature), batch["response"])
    torch.testing.assert_close(recomputed[mask > 0], logprobs[mask > 0], rtol=1e-5, atol=1e-4)
    approx_kl = 0.5 * (torch.where(mask > 0, recomputed - logprobs, 0.0) ** 2).sum() / mask.sum()
    assert approx_kl < 1e-6


def test_top_k_1_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 4.9]])
    torch.manual_seed(0)
    assert sample_token(logits, 1.0, top_k=1).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities ~ [0.665, 0.245, 0.090]: top_p=0.5 keeps only the first token
    logits = torch.log(torch.tensor([[0.665, 0.245, 0.090]]))
    torch.manual_seed(0)
    draws = {sample_token(logits, 1.0, top_p=0.5).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample_token(logits, 1.0, top_p=0.8).item() for _ in range(200)}
    assert draws == {0, 1}


def test_trim_padding_hand_cases():
    P = 0  # pad id
    query = torch.tensor([[P, P, 5, 6], [P, P, P, 7]])
    # row 0 ends at its first token (EOS first), row 1 uses 3 of 5 columns: 2 columns are padding in both
    batch = {"query": query, "query_mask": (query != P).long(),
             "response": torch.tensor([[2, P, P, P, P], [8, 9, 2, P, P]]),
             "response_mask": torch.tensor([[1., 0, 0, 0, 0], [1, 1, 1, 0, 0]]), "scores": torch.tensor([0.5, -1.0])}
    trimmed = trim_padding(batch)
    assert trimmed["query"].tolist() == [[5, 6], [P, 7]] and trimmed["query_mask"].tolist() == [[1, 1], [0, 1]]
    assert trimmed["response"].tolist() == [[2, P, P], [8, 9, 2]]
    assert trimmed["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert trimmed["scores"].tolist() == [0.5, -1.0]  # one number per row: kept as it is
    # full length and no padding: nothing to drop
    full = {**batch, "query": query[:, 2:], "query_mask": torch.ones(2, 2, dtype=torch.long),
            "response_mask": torch.ones(2, 5)}
    trimmed = trim_padding(full)
    assert trimmed["query"].shape == (2, 2) and trimmed["response"].shape == (2, 5)
    # every response ended at its first token (EOS first): one column is left
    first_only = torch.zeros(2, 5)
    first_only[:, 0] = 1
    assert trim_padding({**batch, "response_mask": first_only})["response"].shape == (2, 1)


def test_trimmed_forward_equals_the_full_one(lm):
    """What the PPO update computes on a trimmed micro-batch equals the full batch's kept columns."""
    model, tok = lm
    torch.manual_seed(0)
    batch = generate(model, prompts_of(tok, TEXTS), 16, [tok.eos_token_id], tok.pad_token_id, temperature=1.0)
    rows = [0, 1]  # the two shorter prompts: the longest one's left padding goes
    two = {key: x[rows] for key, x in batch.items()}
    with torch.no_grad():
        full = logprobs_from_logits(policy_logits(model, two), two["response"])
        trimmed_batch = trim_padding(two)
        trimmed = logprobs_from_logits(policy_logits(model, trimmed_batch), trimmed_batch["response"])
    R = trimmed.size(1)
    assert trimmed_batch["query"].size(1) < batch["query"].size(1)
    mask = two["response_mask"]
    torch.testing.assert_close(trimmed[mask[:, :R] > 0], full[:, :R][mask[:, :R] > 0], rtol=1e-5, atol=1e-5)
    assert (mask[:, R:] == 0).all()  # nothing real was dropped
