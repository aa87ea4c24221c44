"""Specification of nanorlhf.ppo: hand-worked cases, slow loop references, padding garbage.

Shapes: [B, T] = batch, response tokens. A mask row is a prefix of ones (the real tokens,
EOS included) followed by zeros (padding).
"""

import math

import pytest
import torch

from nanorlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    broadcast_to_tokens,
    clamp_stop_advantages,
    compute_gae,
    entropy_from_logits,
    estimate_advantages,
    explained_variance,
    grpo_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    penalize_scores,
    policy_loss,
    reinforce_advantages,
    rloo_advantages,
    shape_rewards,
    value_loss,
)

T = 6  # response length of the random batches
MASK_CASES = {
    "empty": [0, 0],  # no real token at all
    "full": [T, T],  # no padding
    "eos_first": [1, 1],  # EOS as the first token: mask [1, 0, 0, ...]
    "mixed": [0, T, 1, 3, 2, 5, 4, 2],  # all of the above and more, in one batch
}
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e9]


def make_mask(lengths, num_tokens=T):
    return torch.tensor([[1.0] * n + [0.0] * (num_tokens - n) for n in lengths])


def randn(batch_size, seed, num_tokens=T):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)


def fill_padding(x, mask, value):
    return torch.where(mask > 0, x, torch.full_like(x, value))


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected, atol=atol, rtol=0)


def assert_same_on_real_and_zero_on_padding(clean, dirty, mask):
    """clean/dirty: [B, T] outputs of the same function without/with garbage in the padding."""
    real = mask > 0
    assert torch.equal(dirty[~real], torch.zeros_like(dirty[~real]))
    torch.testing.assert_close(dirty[real], clean[real], atol=1e-6, rtol=0)


# ---- slow references: plain Python floats, one sequence and one token at a time ----


def real_values(x, lengths):
    return [float(x[b, t]) for b, n in enumerate(lengths) for t in range(n)]


def ref_mean(values):
    return sum(values) / len(values) if values else 0.0


def ref_var(values, unbiased=True):
    n = len(values)
    if n - (1 if unbiased else 0) < 1:
        return 0.0
    mean = ref_mean(values)
    return sum((v - mean) ** 2 for v in values) / (n - 1 if unbiased else n)


def ref_kl(logp, ref, estimator):
    r = ref - logp
    return {"k1": -r, "k2": 0.5 * r * r, "k3": (math.exp(r) - 1) - r}[estimator]


def ref_gae_row(rewards, values, n, gamma, lam):
    advantages, returns = [0.0] * T, [0.0] * T
    next_advantage = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t] = next_advantage
        returns[t] = next_advantage + values[t]
    return advantages, returns


# ---- masked statistics ----


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])


def test_masked_mean_without_real_tokens_is_zero():
    close(masked_mean(torch.ones(2, 3), torch.zeros(2, 3)), 0.0)
    close(masked_mean(torch.ones(2, 3), make_mask([2, 0], 3), dim=1), [1.0, 0.0])


def test_masked_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3
    close(masked_var(x, mask), 14 / 3 / 2)
    close(masked_var(x, mask, unbiased=False), 14 / 3 / 3)


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # mean 2, unbiased var (1 + 1) / 1 = 2
    s = 1 / math.sqrt(2 + 1e-8)
    close(masked_whiten(x, mask), [[-s, s, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[2 - s, 2 + s, 0.0]])


@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_statistics_match_loop_reference(case):
    lengths = MASK_CASES[case]
    mask, x = make_mask(lengths), randn(len(lengths), seed=0) * 3 + 1
    values = real_values(x, lengths)
    close(masked_mean(x, mask), ref_mean(values))
    close(masked_mean(x, mask, dim=1), [ref_mean(real_values(x[b : b + 1], [n])) for b, n in enumerate(lengths)])
    close(masked_var(x, mask), ref_var(values))
    close(masked_var(x, mask, unbiased=False), ref_var(values, unbiased=False))
    for shift_mean in (True, False):
        mean, std = ref_mean(values), math.sqrt(ref_var(values) + 1e-8)
        expected = [
            [(float(x[b, t]) - mean) / std + (0.0 if shift_mean else mean) if t < n else 0.0 for t in range(T)]
            for b, n in enumerate(lengths)
        ]
        close(masked_whiten(x, mask, shift_mean=shift_mean), expected)


def test_whitened_values_have_zero_mean_and_unit_variance():
    lengths = MASK_CASES["mixed"]
    mask = make_mask(lengths)
    whitened = masked_whiten(randn(len(lengths), seed=1) * 5 + 3, mask)
    close(masked_mean(whitened, mask), 0.0)
    close(masked_var(whitened, mask), 1.0, atol=1e-6)


# ---- log-probabilities and entropy ----


def test_logprobs_and_entropy_by_hand():
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]])
    close(logprobs_from_logits(logits, torch.tensor([[2, 0]])), [[math.log(0.5), math.log(0.25)]])
    # H = -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2
    close(entropy_from_logits(logits), [[1.5 * math.log(2)] * 2])
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])


def test_minus_infinite_logits_are_impossible_tokens():
    logits = torch.tensor([[[0.0, float("-inf")]]])
    close(logprobs_from_logits(logits, torch.tensor([[0]])), [[0.0]])
    close(entropy_from_logits(logits), [[0.0]])


def test_logprobs_and_entropy_match_loop_reference():
    batch_size, vocab = 3, 7
    logits = torch.randn(batch_size, T, vocab, generator=torch.Generator().manual_seed(2)) * 4
    tokens = torch.randint(0, vocab, (batch_size, T), generator=torch.Generator().manual_seed(3))
    expected_logprobs, expected_entropy = [], []
    for b in range(batch_size):
        logprob_row, entropy_row = [], []
        for t in range(T):
            row = [float(v) for v in logits[b, t]]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            logprob_row.append(row[int(tokens[b, t])] - log_z)
            entropy_row.append(-sum(math.exp(v - log_z) * (v - log_z) for v in row))
        expected_logprobs.append(logprob_row)
        expected_entropy.append(entropy_row)
    close(logprobs_from_logits(logits, tokens), expected_logprobs)
    close(entropy_from_logits(logits), expected_entropy)


def test_bf16_logits_give_float32_logprobs():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    logprobs = logprobs_from_logits(logits.bfloat16(), tokens)
    assert logprobs.dtype == torch.float32 and entropy_from_logits(logits.bfloat16()).dtype == torch.float32
    close(logprobs, logprobs_from_logits(logits.bfloat16().float(), tokens))


def test_garbage_logits_at_one_position_do_not_leak_to_others():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    dirty = logits.clone()
    dirty[1, 2] = float("nan")
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    close(logprobs_from_logits(dirty, tokens)[keep], logprobs_from_logits(logits, tokens)[keep])
    close(entropy_from_logits(dirty)[keep], entropy_from_logits(logits)[keep])


# ---- KL estimators ----


def test_kl_estimators_by_hand():
    logprobs, ref_logprobs = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # r = ref - logp = -ln 2
    close(kl_penalty(logprobs, ref_logprobs, "k1"), [[math.log(2)]])  # 0.693147
    close(kl_penalty(logprobs, ref_logprobs, "k2"), [[0.5 * math.log(2) ** 2]])  # 0.240227
    close(kl_penalty(logprobs, ref_logprobs, "k3"), [[(0.5 - 1) + math.log(2)]])  # 0.193147
    close(kl_penalty(logprobs, ref_logprobs), [[math.log(2)]])  # k1 is the default


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_loop_reference_and_vanish_when_equal(estimator):
    logprobs, ref_logprobs = randn(4, seed=6), randn(4, seed=7)
    expected = [
        [ref_kl(float(logprobs[b, t]), float(ref_logprobs[b, t]), estimator) for t in range(T)] for b in range(4)
    ]
    close(kl_penalty(logprobs, ref_logprobs, estimator), expected)
    close(kl_penalty(logprobs, logprobs, estimator), torch.zeros(4, T))


def test_k3_is_never_negative():
    logprobs, ref_logprobs = randn(64, seed=8) * 10, randn(64, seed=9) * 10
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()


def test_unknown_kl_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---- reward shaping ----


def test_shape_rewards_by_hand():
    scores = torch.tensor([2.0, 5.0, 7.0])
    mask = make_mask([2, 0, 3], 3)
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 9.0], [3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]])
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: k1 = [0.5, -1.0] -> -0.1 * k1 = [-0.05, 0.1], score 2 on the last real token
    # row 1: empty, its score 5 is dropped; row 2: no KL, score 7 on the last token
    close(rewards, [[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 7.0]])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("case", MASK_CASES)
def test_shape_rewards_match_loop_reference(case, estimator):
    lengths = MASK_CASES[case]
    mask, logprobs, ref_logprobs = make_mask(lengths), randn(len(lengths), seed=10), randn(len(lengths), seed=11)
    scores = torch.randn(len(lengths), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    kl_coef = 0.3
    expected = []
    for b, n in enumerate(lengths):
        row = [0.0] * T
        for t in range(n):
            row[t] = -kl_coef * ref_kl(float(logprobs[b, t]), float(ref_logprobs[b, t]), estimator)
        if n > 0:
            row[n - 1] += float(scores[b])
        expected.append(row)
    close(shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator), expected)


# ---- GAE ----


def test_gae_by_hand():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72, and V after the last token is 0:
    # t=2: delta = 2 + 0.9 * 0   - 1.5 = 0.5    A2 = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35   A1 = 0.35 + 0.72 * 0.5  = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4    A0 = 1.4  + 0.72 * 0.71 = 1.9112
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5]])
    close(returns, [[2.4112, 1.71, 2.0]])  # A + V


def test_gae_ends_the_episode_at_the_last_real_token():
    rewards, values = torch.tensor([[1.0, 0.0, 123.0]]), torch.tensor([[0.5, 1.0, 456.0]])
    # t=1 is the last real token: delta = 0 + 0.9 * 0 - 1.0 = -1.0   A1 = -1.0
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4                          A0 = 1.4 - 0.72 = 0.68
    advantages, returns = compute_gae(rewards, values, make_mask([2], 3), gamma=0.9, lam=0.8)
    close(advantages, [[0.68, -1.0, 0.0]])
    close(returns, [[1.18, 0.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("case", MASK_CASES)
def test_gae_matches_loop_reference(case, gamma, lam):
    lengths = MASK_CASES[case]
    mask, rewards, values = make_mask(lengths), randn(len(lengths), seed=13), randn(len(lengths), seed=14)
    expected = [ref_gae_row(rewards[b].tolist(), values[b].tolist(), n, gamma, lam) for b, n in enumerate(lengths)]
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    close(advantages, [a for a, _ in expected])
    close(returns, [r for _, r in expected])


# ---- policy loss ----


@pytest.mark.parametrize("case", MASK_CASES)
def test_policy_loss_with_ratio_one_is_minus_mean_advantage(case):
    lengths = MASK_CASES[case]
    mask, logprobs, advantages = make_mask(lengths), randn(len(lengths), seed=15), randn(len(lengths), seed=16)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    close(loss, -ref_mean(real_values(advantages, lengths)))
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)
    close(stats["ratio"], 1.0 if sum(lengths) else 0.0)


def test_policy_loss_clipping_by_hand():
    # cliprange 0.2 -> ratios clamp to [0.8, 1.2]; the last column is padding
    ratios = [1.5, 0.5, 1.0, 0.5]
    old_logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 7.0]])
    logprobs = old_logprobs + torch.tensor([[math.log(r) for r in ratios] + [float("nan")]])
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0, float("inf")]])
    # A= 1, ratio 1.5: pg_loss1 = -1.5, pg_loss2 = -1.2 -> -1.2 (clipped)
    # A=-1, ratio 0.5: pg_loss1 =  0.5, pg_loss2 =  0.8 ->  0.8 (clipped)
    # A= 2, ratio 1.0: pg_loss1 = -2.0, pg_loss2 = -2.0 -> -2.0
    # A= 1, ratio 0.5: pg_loss1 = -0.5, pg_loss2 = -0.8 -> -0.5 (the pessimistic side is unclipped)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, make_mask([4], 5), cliprange=0.2)
    close(loss, (-1.2 + 0.8 - 2.0 - 0.5) / 4)  # -0.725
    close(stats["clipfrac"], 0.5)
    close(stats["approxkl"], 0.5 * sum(math.log(r) ** 2 for r in ratios) / 4)  # 0.140663
    close(stats["ratio"], sum(ratios) / 4)  # 0.875


@pytest.mark.parametrize("case", MASK_CASES)
def test_policy_loss_matches_loop_reference(case):
    lengths = MASK_CASES[case]
    batch_size, cliprange = len(lengths), 0.2
    mask, advantages = make_mask(lengths), randn(batch_size, seed=17)
    old_logprobs = randn(batch_size, seed=18)
    logprobs = old_logprobs + 0.3 * randn(batch_size, seed=19)
    losses, clipped, squared_log_ratios, ratios = [], [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            log_ratio = float(logprobs[b, t]) - float(old_logprobs[b, t])
            ratio, advantage = math.exp(log_ratio), float(advantages[b, t])
            pg_loss1 = -advantage * ratio
            pg_loss2 = -advantage * min(max(ratio, 1 - cliprange), 1 + cliprange)
            losses.append(max(pg_loss1, pg_loss2))
            clipped.append(1.0 if pg_loss2 > pg_loss1 else 0.0)
            squared_log_ratios.append(log_ratio**2)
            ratios.append(ratio)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
    close(loss, ref_mean(losses))
    close(stats["clipfrac"], ref_mean(clipped))
    close(stats["approxkl"], 0.5 * ref_mean(squared_log_ratios))
    close(stats["ratio"], ref_mean(ratios))


def test_policy_loss_stats_are_detached_tensors():
    logprobs = torch.zeros(1, 3, requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), 0.2)
    assert loss.requires_grad
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


# ---- value loss ----


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[2.0, 1.1, -1.0, float("nan")]])
    old_values = torch.tensor([[1.0, 1.0, 0.0, float("inf")]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 1e9]])
    mask = make_mask([3], 4)
    # c = 0.2: v_clipped = [1.2, 1.1, -0.2]
    # unclipped squares [0, 1.21, 4], clipped squares [0.64, 1.21, 1.44], max [0.64, 1.21, 4]
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * (0.64 + 1.21 + 4.0) / 3)  # 0.975
    close(stats["clipfrac"], 1 / 3)
    close(stats["vpred"], (2.0 + 1.1 - 1.0) / 3)
    close(stats["error"], (0.0 + 1.21 + 4.0) / 3)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=None)
    close(loss, 0.5 * (0.0 + 1.21 + 4.0) / 3)  # 0.868333
    close(stats["clipfrac"], 0.0)


@pytest.mark.parametrize("cliprange_value", [0.2, None])
@pytest.mark.parametrize("case", MASK_CASES)
def test_value_loss_matches_loop_reference(case, cliprange_value):
    lengths = MASK_CASES[case]
    batch_size = len(lengths)
    mask, returns, old_values = make_mask(lengths), randn(batch_size, seed=20), randn(batch_size, seed=21)
    values = old_values + 0.5 * randn(batch_size, seed=22)
    losses, clipped, predictions, errors = [], [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            v, old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            unclipped = (v - ret) ** 2
            if cliprange_value is None:
                clipped_square = unclipped
            else:
                clipped_square = (old + min(max(v - old, -cliprange_value), cliprange_value) - ret) ** 2
            losses.append(max(unclipped, clipped_square))
            clipped.append(1.0 if clipped_square > unclipped else 0.0)
            predictions.append(v)
            errors.append(unclipped)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value)
    close(loss, 0.5 * ref_mean(losses))
    close(stats["clipfrac"], ref_mean(clipped))
    close(stats["vpred"], ref_mean(predictions))
    close(stats["error"], ref_mean(errors))


# ---- explained variance ----


def test_explained_variance_by_hand():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), make_mask([3], 4)
    # residuals [0, 0, 1]: var 2/9; var(returns) = 2/3 -> 1 - (2/9) / (2/3) = 2/3
    close(explained_variance(torch.tensor([[1.0, 2.0, 2.0, -50.0]]), returns, mask), 2 / 3)
    close(explained_variance(returns, returns, mask), 1.0)  # a perfect critic
    close(explained_variance(torch.zeros(1, 4), returns, mask), 0.0)  # a constant critic explains nothing
    close(explained_variance(-returns, returns, mask), 1 - 4.0)  # var(2R) = 4 var(R): worse than nothing


def test_explained_variance_is_nan_when_returns_are_constant():
    assert torch.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)))


@pytest.mark.parametrize("case", ["full", "mixed"])
def test_explained_variance_matches_loop_reference(case):
    lengths = MASK_CASES[case]
    mask, values, returns = make_mask(lengths), randn(len(lengths), seed=23), randn(len(lengths), seed=24)
    residuals = [r - v for r, v in zip(real_values(returns, lengths), real_values(values, lengths))]
    expected = 1 - ref_var(residuals, unbiased=False) / ref_var(real_values(returns, lengths), unbiased=False)
    close(explained_variance(values, returns, mask), expected)


# ---- KL controllers ----


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=256)  # error 6.6/6 - 1 = 0.1
    close(controller.value, 0.2 * (1 + 0.1 * 256 / 10000))  # 0.200512
    controller.update(current_kl=torch.tensor(60.0), n_steps=256)  # error 9 is clipped to 0.2
    close(controller.value, 0.2 * 1.00256 * 1.00512)
    controller.update(current_kl=0.0, n_steps=10000)  # error -1 is clipped to -0.2
    close(controller.value, 0.2 * 1.00256 * 1.00512 * 0.8)


def test_kl_controllers_round_trip_through_state_dict():
    controller = AdaptiveKLController(0.2, 6.0, 10000)
    controller.update(9.0, 256)
    state = controller.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(0.05, 6.0, 10000)
    restored.load_state_dict(state)
    assert restored.value == controller.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# ---- critic-free advantages ----


def test_reinforce_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, float("nan")]])
    mask = make_mask([3, 2], 3)
    # gamma 0.9: [1 + 0.9 * 0 + 0.81 * 2, 0 + 0.9 * 2, 2]; row 1 (gamma 0.9): [1 + 1.8, 2, 0]
    close(reinforce_advantages(rewards, mask, gamma=0.9), [[2.62, 1.8, 2.0], [2.8, 2.0, 0.0]])
    close(reinforce_advantages(rewards, mask), [[3.0, 2.0, 2.0], [3.0, 2.0, 0.0]])  # gamma 1


@pytest.mark.parametrize("case", MASK_CASES)
def test_reinforce_advantages_match_loop_reference(case):
    lengths, gamma = MASK_CASES[case], 0.95
    mask, rewards = make_mask(lengths), randn(len(lengths), seed=25)
    expected = []
    for b, n in enumerate(lengths):
        row = [0.0] * T
        for t in range(n):
            row[t] = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, n))
        expected.append(row)
    close(reinforce_advantages(rewards, mask, gamma), expected)


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # k=2: groups [1, 2] and [3, 6]; each sample's baseline is the other one
    close(rloo_advantages(scores, k=2), [-1.0, 1.0, -3.0, 3.0])
    # k=4: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    close(rloo_advantages(scores, k=4), [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # k=2: [1, 2] has mean 1.5, unbiased std sqrt(0.5); [3, 6] has mean 4.5, std sqrt(4.5)
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 1.5 / (math.sqrt(4.5) + 1e-4)
    close(grpo_advantages(scores, k=2), [-a, a, -b, b])
    # k=4: mean 3, deviations [-2, -1, 0, 3], unbiased std sqrt(14 / 3)
    std = math.sqrt(14 / 3)
    close(grpo_advantages(scores, k=4), [d / (std + 1e-4) for d in (-2, -1, 0, 3)])
    close(grpo_advantages(scores, k=4, eps=0.0), [d / std for d in (-2, -1, 0, 3)])


def test_group_with_equal_scores_gets_zero_advantage():
    scores = torch.tensor([5.0, 5.0, 1.0, 3.0])
    close(grpo_advantages(scores, k=2)[:2], [0.0, 0.0])
    close(rloo_advantages(scores, k=2)[:2], [0.0, 0.0])


@pytest.mark.parametrize("estimator", [rloo_advantages, grpo_advantages])
def test_group_estimators_reject_bad_group_sizes(estimator):
    with pytest.raises(ValueError):
        estimator(torch.tensor([1.0, 2.0]), k=1)
    with pytest.raises(ValueError):
        estimator(torch.tensor([1.0, 2.0, 3.0]), k=2)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_group_estimators_match_loop_reference(k):
    scores = torch.randn(4 * k, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    expected_rloo, expected_grpo = [], []
    for g in range(4):
        group = [float(s) for s in scores[g * k : (g + 1) * k]]
        mean = sum(group) / k
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (k - 1))
        for i, s in enumerate(group):
            expected_rloo.append(s - (sum(group) - s) / (k - 1))
            expected_grpo.append((s - mean) / (std + 1e-4))
    close(rloo_advantages(scores, k), expected_rloo)
    close(grpo_advantages(scores, k), expected_grpo)


def test_broadcast_to_tokens_by_hand():
    advantages = torch.tensor([2.0, float("nan"), -1.0])
    expected = [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]  # the empty row's nan is dropped
    close(broadcast_to_tokens(advantages, make_mask([2, 0, 3], 3)), expected)


# ---- padding garbage: NaN, inf or 1e9 in the padding changes nothing ----

def loss_and_stats(loss, stats):
    return (loss, *stats.values())


# Each entry maps the [B, T] inputs (a, b, c) and the mask to a tuple of outputs;
# per-token outputs are [B, T], the others are scalars.
SCORES = torch.randn(len(MASK_CASES["mixed"]), dtype=torch.float64, generator=torch.Generator().manual_seed(27))
FUNCTIONS_OF_PADDED_INPUTS = {
    "masked_mean": lambda a, b, c, m: (masked_mean(a, m), masked_mean(a, m, dim=1)),
    "masked_var": lambda a, b, c, m: (masked_var(a, m), masked_var(a, m, unbiased=False)),
    "masked_whiten": lambda a, b, c, m: (masked_whiten(a, m), masked_whiten(a, m, shift_mean=False)),
    "shape_rewards": lambda a, b, c, m: tuple(shape_rewards(SCORES, a, b, m, 0.1, e) for e in ("k1", "k2", "k3")),
    "compute_gae": lambda a, b, c, m: compute_gae(a, b, m, gamma=0.99, lam=0.95),
    "policy_loss": lambda a, b, c, m: loss_and_stats(*policy_loss(a, b, c, m, 0.2)),
    "value_loss": lambda a, b, c, m: loss_and_stats(*value_loss(a, b, c, m, 0.2)),
    "value_loss_unclipped": lambda a, b, c, m: loss_and_stats(*value_loss(a, b, c, m, None)),
    "explained_variance": lambda a, b, c, m: (explained_variance(a, b, m),),
    "reinforce_advantages": lambda a, b, c, m: (reinforce_advantages(a, m, gamma=0.9),),
    "clamp_stop_advantages": lambda a, b, c, m: (clamp_stop_advantages(a, m, SCORES > 0),),
}


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("name", FUNCTIONS_OF_PADDED_INPUTS)
def test_padding_garbage_changes_nothing(name, garbage):
    function, lengths = FUNCTIONS_OF_PADDED_INPUTS[name], MASK_CASES["mixed"]
    mask = make_mask(lengths)
    inputs = [randn(len(lengths), seed=seed) for seed in (28, 29, 30)]
    clean = function(*inputs, mask)
    dirty = function(*[fill_padding(x, mask, garbage) for x in inputs], mask)
    for clean_output, dirty_output in zip(clean, dirty):
        if clean_output.dim() == 2:
            assert_same_on_real_and_zero_on_padding(clean_output, dirty_output, mask)
        else:
            close(dirty_output, clean_output)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_gradients_stay_finite_with_padding_garbage(garbage):
    lengths = MASK_CASES["mixed"]
    mask = make_mask(lengths)
    logprobs = fill_padding(randn(len(lengths), seed=31), mask, garbage).requires_grad_()
    values = fill_padding(randn(len(lengths), seed=32), mask, garbage).requires_grad_()
    old = fill_padding(randn(len(lengths), seed=33), mask, garbage)
    target = fill_padding(randn(len(lengths), seed=34), mask, garbage)
    loss = policy_loss(logprobs, old, target, mask, 0.2)[0] + value_loss(values, old, target, mask, 0.2)[0]
    loss = loss + masked_whiten(values, mask).sum()
    loss.backward()
    for grad in (logprobs.grad, values.grad):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))


# ---- step 6 as one call, step 2's adjustments ----


def test_estimate_advantages_by_hand_for_every_estimator():
    # two prompts x k=2 samples; rows: full length, EOS first, empty, two tokens
    rewards = torch.tensor([[1.0, 2.0], [3.0, 9.0], [5.0, 5.0], [0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 7.0], [2.0, 2.0], [0.0, 0.0]])
    # gae, gamma 1, lam 1: A_t = sum of the rewards from t on minus V_t; returns = the rewards to go
    advantages, returns = estimate_advantages(rewards, values, mask, "gae", gamma=1.0, lam=1.0)
    close(advantages, [[2.5, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.5]])
    close(returns, [[3.0, 2.0], [3.0, 0.0], [0.0, 0.0], [1.0, 0.5]])
    advantages, returns = estimate_advantages(rewards, values, mask, "reinforce", gamma=1.0)
    close(advantages, [[3.0, 2.0], [3.0, 0.0], [0.0, 0.0], [1.0, 0.5]])
    assert torch.equal(advantages, returns)
    # sequence rewards 3, 3 (first prompt) and 0, 1 (second): rloo's baselines are the other sample's
    advantages, _ = estimate_advantages(rewards, values, mask, "rloo", k=2)
    close(advantages, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    advantages, _ = estimate_advantages(rewards, values, mask, "grpo", k=2)
    close(advantages, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [a, a]])
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimate_advantages(rewards, values, mask, "ppo")


def test_penalize_scores_by_hand():
    scores, ended = torch.tensor([1.0, 4.0, -3.0]), torch.tensor([True, False, False])
    close(penalize_scores(scores, ended), [1.0, 4.0, -3.0])  # both off
    close(penalize_scores(scores, ended, missing_eos_penalty=1.5), [1.0, 2.5, -4.5])
    close(penalize_scores(scores, ended, missing_eos_penalty=1.5, reward_clip=2.0), [1.0, 2.0, -2.0])


def test_clamp_stop_advantages_by_hand():
    advantages = torch.tensor([[-1.0, 2.0, -3.0], [-2.0, -5.0, 9.0], [-4.0, 7.0, 7.0], [-1.0, -2.0, -3.0],
                               [1.0, 2.0, 2.5], [-6.0, 1.0, 1.0]])
    # rows: ended at full length, ended after 2 tokens, EOS first, cut off at full length (never ended),
    # ended with a positive advantage, empty
    mask = make_mask([3, 2, 1, 3, 3, 0], num_tokens=3)
    ended = torch.tensor([True, True, True, False, True, False])
    close(clamp_stop_advantages(advantages, mask, ended),
          [[-1.0, 2.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -3.0], [1.0, 2.0, 2.5],
           [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("case", MASK_CASES)
def test_clamp_stop_advantages_match_loop_reference(case):
    lengths = MASK_CASES[case]
    mask, advantages = make_mask(lengths), randn(len(lengths), seed=35)
    ended = torch.tensor([i % 2 == 0 for i in range(len(lengths))])
    expected = [[0.0] * T for _ in lengths]
    for b, n in enumerate(lengths):
        for t in range(n):
            is_stop = bool(ended[b]) and t == n - 1
            expected[b][t] = max(float(advantages[b, t]), 0.0) if is_stop else float(advantages[b, t])
    close(clamp_stop_advantages(advantages, mask, ended), expected)
