"""The maths of RLHF with PPO, as small pure functions on tensors.

Shapes: [B, T] = batch, response tokens. `mask` is a float tensor, 1.0 on real response
tokens (the EOS token counts as real) and 0.0 on the padding after EOS; the real tokens are
always a prefix of each row (possibly empty, possibly the whole row).

Padding contributes nothing, whatever garbage sits there (even NaN or inf): every function
first replaces padding with 0 through torch.where (never `x * mask`, since 0 * nan = nan),
and per-token outputs are 0.0 at padding. Replacing the inputs, not just the outputs, also
keeps gradients finite: torch.where passes a zero gradient to the unselected branch, but
0 * inf = nan if that branch's own derivative is infinite.
"""

import torch
import torch.nn.functional as F


def _real(mask):
    return mask > 0


def _zero_padding(x, real):
    return torch.where(real, x, torch.zeros_like(x))


def _last_real_token(mask):
    """[B, T] bool: True at each row's last real token (none in a row without real tokens)."""
    lengths = _real(mask).sum(dim=1)  # real tokens are a prefix, so the last one is at lengths - 1
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions.unsqueeze(0) == (lengths - 1).unsqueeze(1)) & (lengths > 0).unsqueeze(1)


def _at_least_float32(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_mean(x, mask, dim=None, reduce=None):
    """Mean of x over real tokens: sum_{mask=1} x / sum(mask).

    x, mask: [B, T]. dim=None averages over everything (a scalar); dim=1 gives one mean
    per row ([B]). Where there is no real token at all the mean is 0, not nan.
    reduce (dim=None only): a function that sums a tensor over the processes of a torchrun
    run (distributed.sum_over_ranks), so the mean is over every process's tokens; None = this batch.
    """
    real = _real(mask)
    total, count = _zero_padding(x, real).sum(dim=dim), real.sum(dim=dim)
    if reduce is not None:
        total, count = reduce(torch.stack([total, count.to(total.dtype)]))
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x, mask, unbiased=True, reduce=None):
    """Variance of x over real tokens (a scalar): sum (x - mean)^2 / (n - 1), or / n if not unbiased.

    The unbiased estimate needs n >= 2 real tokens; with fewer we return 0, so that
    whitening maps a lone token to its mean instead of to nan. reduce: as in masked_mean.
    """
    real = _real(mask)
    x = _zero_padding(x, real)
    mean = masked_mean(x, mask, reduce=reduce)
    n = real.sum().to(mean.dtype)
    sum_sq = (_zero_padding(x - mean, real) ** 2).sum()
    if reduce is not None:
        n, sum_sq = reduce(torch.stack([n, sum_sq]))
    denominator = n - 1 if unbiased else n
    return sum_sq / denominator if denominator >= 1 else torch.zeros_like(sum_sq)


def masked_whiten(x, mask, shift_mean=True, reduce=None):
    """Normalise x to mean 0, variance 1 over the real tokens of the whole batch: [B, T] -> [B, T].

    whitened = (x - mean) / sqrt(var + 1e-8), var unbiased as in TRL's PPOTrainer.
    With shift_mean=False the mean is added back (only the scale changes), which is how
    rewards are whitened in lm-human-preferences. Padding is 0. reduce: as in masked_mean (under
    torchrun the mean and variance are those of every process's batch).
    """
    real = _real(mask)
    x = _zero_padding(x, real)
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, real)


def logprobs_from_logits(logits, tokens):
    """log pi(token_t | context_t) for each position: logits [B, T, V], tokens [B, T] -> [B, T].

    logprob_t = log_softmax(logits_t)[token_t] = logits_t[token_t] - logsumexp(logits_t).
    The vocabulary is large (V ~ 32k-150k), so we go one row at a time: only one [T, V]
    float copy exists at once, instead of a [B, T, V] one. bf16/fp16 logits are upcast to
    float32 first (bf16 log-probabilities are too coarse for the PPO ratio).
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logprobs = F.log_softmax(_at_least_float32(row_logits), dim=-1)
        rows.append(row_logprobs.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits):
    """Entropy of the next-token distribution at each position: logits [B, T, V] -> [B, T].

    H_t = -sum_v p_v log p_v with p = softmax(logits_t); terms with p_v = 0 count 0
    (so -inf logits, e.g. from a masked vocabulary, are fine). One row at a time, >= float32.
    """
    rows = []
    for row_logits in logits:
        logp = F.log_softmax(_at_least_float32(row_logits), dim=-1)
        p = logp.exp()
        rows.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))
    return torch.stack(rows)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from one sample: [B, T], [B, T] -> [B, T].

    In the letters of Schulman, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html),
    for a token x sampled from pi: r = pi_ref(x) / pi(x), so log r = ref_logprobs - logprobs, and
      k1 = -log r                   unbiased, high variance, can be negative
      k2 = (log r)^2 / 2            biased, low variance, >= 0
      k3 = (r - 1) - log r          unbiased, low variance, >= 0
    """
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'k2' or 'k3'")
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return torch.expm1(log_r) - log_r  # expm1(log r) = r - 1, exact when r is close to 1


def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Token-level rewards for PPO: scores [B], logprobs/ref_logprobs/mask [B, T] -> [B, T].

    reward_t = -kl_coef * kl_t on every real token, and the sequence score (from the reward
    model) is added on the last real token, as in Ziegler et al. 2019 / lm-human-preferences.
    Padding gets 0. A row with no real token gets all zeros: its score is dropped, since there
    is no token to give it to.
    """
    real = _real(mask)
    kl = kl_penalty(_zero_padding(logprobs, real), _zero_padding(ref_logprobs, real), estimator)
    rewards = _zero_padding(-kl_coef * kl, real)
    is_last = _last_real_token(mask)
    score_column = scores.to(rewards.dtype).unsqueeze(1).expand_as(rewards)
    return rewards + torch.where(is_last, score_column, torch.zeros_like(rewards))


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation (Schulman et al. 2015): [B, T] x3 -> (advantages, returns).

    Going backwards over the tokens:
      delta_t = r_t + gamma * V_{t+1} - V_t
      A_t     = delta_t + gamma * lam * A_{t+1}
    where V_{t+1} = 0 and A_{t+1} = 0 after a sequence's last real token (the episode ends).
    returns_t = A_t + V_t is the value target. Both are 0 on padding.
    """
    real = _real(mask)
    rewards, values = _zero_padding(rewards, real), _zero_padding(values, real)
    batch_size, num_tokens = rewards.shape
    next_value = torch.zeros(batch_size, dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    advantages_reversed = []
    for t in reversed(range(num_tokens)):
        # values is 0 on padding, so next_value is 0 after the last real token
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantage = _zero_padding(advantage, real[:, t])
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = _zero_padding(advantages + values, real)
    return advantages, returns


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """PPO's clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    All inputs [B, T]. ratio = exp(logprobs - old_logprobs) = pi / pi_old;
      pg_loss1 = -A * ratio
      pg_loss2 = -A * clamp(ratio, 1 - cliprange, 1 + cliprange)
      loss     = masked_mean(max(pg_loss1, pg_loss2))     (a scalar)
    stats (detached scalars): clipfrac (share of real tokens where pg_loss2 > pg_loss1),
    approxkl (0.5 * masked_mean((logprobs - old_logprobs)^2), as TRL), ratio (mean ratio).
    """
    real = _real(mask)
    logprobs, old_logprobs = _zero_padding(logprobs, real), _zero_padding(old_logprobs, real)
    advantages = _zero_padding(advantages, real)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    stats = {
        "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value):
    """The critic's loss, with PPO-style value clipping (as in TRL and the N+ details paper).

    All inputs [B, T]. v_clipped = old_values + clamp(values - old_values, -c, c);
      loss = 0.5 * masked_mean(max((values - returns)^2, (v_clipped - returns)^2))
    cliprange_value=None turns clipping off: loss = 0.5 * masked_mean((values - returns)^2).
    stats (detached scalars): clipfrac (share of real tokens where the clipped square is
    larger), vpred (mean value), error (mean of (values - returns)^2).
    """
    real = _real(mask)
    values, old_values = _zero_padding(values, real), _zero_padding(old_values, real)
    returns = _zero_padding(returns, real)
    vf_losses1 = (values - returns) ** 2
    if cliprange_value is None:
        vf_losses = vf_losses1
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        vf_losses2 = (v_clipped - returns) ** 2
        vf_losses = torch.max(vf_losses1, vf_losses2)
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask)
    loss = 0.5 * masked_mean(vf_losses, mask)
    stats = {
        "clipfrac": clipfrac.detach(),
        "vpred": masked_mean(values, mask).detach(),
        "error": masked_mean(vf_losses1, mask).detach(),
    }
    return loss, stats


def explained_variance(values, returns, mask, reduce=None):
    """How much of the returns' variance the critic explains: 1 - var(returns - values) / var(returns).

    Over real tokens, a detached scalar. 1 is perfect, 0 is no better than a constant,
    negative is worse. nan when the returns do not vary at all (as in cleanrl). reduce: as in masked_mean.
    """
    real = _real(mask)
    values, returns = _zero_padding(values, real), _zero_padding(returns, real)
    var_returns = masked_var(returns, mask, unbiased=False, reduce=reduce)
    if var_returns == 0:
        return torch.full((), float("nan"), dtype=returns.dtype, device=returns.device)
    return (1 - masked_var(returns - values, mask, unbiased=False, reduce=reduce) / var_returns).detach()


class AdaptiveKLController:
    """Adapts the KL coefficient so the measured KL tracks a target (Ziegler et al. 2019).

    proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
    value <- value * (1 + proportional_error * n_steps / horizon)
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps):
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


# Critic-free advantage estimators. The group estimators (RLOO, GRPO) expect the batch in
# prompt-major layout: B = n_prompts * k, and rows [g*k : (g+1)*k] are the k samples of prompt g.
# They return one advantage per sequence ([B]); broadcast_to_tokens spreads it over the tokens.


def reinforce_advantages(rewards, mask, gamma=1.0):
    """REINFORCE: the discounted return-to-go, no critic and no baseline. [B, T] -> [B, T].

    A_t = sum_{s >= t} gamma^(s - t) * r_s over real tokens; 0 on padding. This is GAE with
    V = 0 and lam = 1, so we reuse it.
    """
    advantages, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return advantages


def _groups(scores, k):
    if k < 2:
        raise ValueError(f"group estimators need k >= 2 samples per prompt, got k={k}")
    if scores.shape[0] % k != 0:
        raise ValueError(f"batch of {scores.shape[0]} sequences is not a multiple of k={k}")
    return scores.view(-1, k)


def rloo_advantages(scores, k):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): scores [B] -> advantages [B].

    A_i = s_i - mean of the other k - 1 scores of the same prompt. scores may be the raw
    reward-model scores or KL-penalised sequence rewards; that is the caller's choice.
    """
    grouped = _groups(scores, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(scores, k, eps=1e-4):
    """GRPO's group-normalised advantage (Shao et al. 2024, DeepSeekMath): scores [B] -> [B].

    A_i = (s_i - mean(group)) / (std(group) + eps), std unbiased (divides by k - 1).
    """
    grouped = _groups(scores, k)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def broadcast_to_tokens(sequence_values, mask):
    """Give each real token its sequence's value: [B], mask [B, T] -> [B, T], 0 on padding."""
    return _zero_padding(sequence_values.unsqueeze(1).expand(mask.shape), _real(mask))


def estimate_advantages(rewards, values, mask, estimator="gae", gamma=1.0, lam=0.95, k=1):
    """Step 6 of a PPO iteration: token rewards [B, T] -> (advantages [B, T], returns [B, T]).

    gae: compute_gae with the critic's values. reinforce: the return-to-go (no critic).
    rloo / grpo: one advantage per sequence from the k samples of its prompt (prompt-major batch),
    computed on the sequence's summed reward and given to each of its tokens. Without a critic the
    returns are the advantages (nothing trains on them).
    """
    if estimator == "gae":
        return compute_gae(rewards, values, mask, gamma, lam)
    if estimator == "reinforce":
        advantages = reinforce_advantages(rewards, mask, gamma)
    elif estimator in ("rloo", "grpo"):
        group_estimator = rloo_advantages if estimator == "rloo" else grpo_advantages
        advantages = broadcast_to_tokens(group_estimator((rewards * mask).sum(1), k), mask)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}: expected gae, reinforce, rloo or grpo")
    return advantages, advantages


def clamp_stop_advantages(advantages, mask, ended):
    """Never push the end of turn down: advantages [B, T] -> [B, T], the advantage of each ended row's
    last real token (its EOS; ended [B] bool) raised to 0 where it is negative. Off by default
    (--clamp_stop_advantage); measured on the demo in docs/demo.md.

    Why: a bad answer's score lands on its EOS token, and there the advantage is score - V(before EOS).
    A critic that cannot yet tell a bad ending from a good one (the demo's: a second "See a doctor if"
    sentence looks to it like the first) values the state before EOS too high, so the EOS token takes
    the largest share of the blame, and the policy learns to stop less after every such sentence.
    With the clamp the blame stays on the tokens that made the answer bad. The price: stopping too
    early is no longer pushed down directly, only through the continuations that did better.
    """
    is_stop = _last_real_token(mask) & ended.to(torch.bool).unsqueeze(1)
    return _zero_padding(torch.where(is_stop, advantages.clamp(min=0), advantages), _real(mask))


def penalize_scores(scores, ended, missing_eos_penalty=0.0, reward_clip=0.0):
    """Step 2's adjustments of the reward model's scores [B]: minus missing_eos_penalty where a response
    never ended (ended [B] bool; N+ details, "EOS trick"), then clipped to [-reward_clip, reward_clip]
    (0 = off for either)."""
    if missing_eos_penalty:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores
