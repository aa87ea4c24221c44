"""The DPO family: preference losses on the policy's log-probabilities, no reward model, no sampling.

Every loss takes summed response log-probs [B] (the log-probability of each answer's tokens, given its
prompt: `sequence_logps`), returns per-pair losses [B] and the implicit rewards TRL logs, and is a
pure function of tensors. B pairs: a chosen (preferred) answer and a rejected one to the same prompt.
"""

import torch
import torch.nn.functional as F

from nanorlhf.data import IGNORE

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")


def sequence_logps(logits, labels):
    """Summed log-probabilities of the labelled tokens of each sequence, and how many there are.

    logits [B, T, V] of a causal LM over input_ids [B, T]; labels [B, T] = input_ids on the answer's
    tokens and IGNORE (-100) elsewhere (the prompt, padding), as SFT labels them. The logit at t-1
    predicts token t. Returns (logps [B], n_tokens [B]), both float32.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    labelled = labels != IGNORE
    tokens = torch.where(labelled, labels, torch.zeros_like(labels))
    rows = []
    for row_logits, row_tokens, row_labelled in zip(logits, tokens, labelled):  # one [T, V] float copy at a time
        logp = F.log_softmax(row_logits.float(), dim=-1).gather(-1, row_tokens[:, None]).squeeze(-1)
        rows.append(torch.where(row_labelled, logp, torch.zeros_like(logp)).sum())
    return torch.stack(rows), labelled.sum(-1).float()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """DPO and IPO: (losses [B], chosen_rewards [B], rejected_rewards [B]).

    The implicit reward of an answer is r = beta * (log pi(y|x) - log pi_ref(y|x)); h is how much more
    the policy moved toward the chosen answer than toward the rejected one:
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    sigmoid (DPO, Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * h)
        with label_smoothing e (conservative DPO, Mitchell 2023: the label is wrong with probability e):
        -(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h)
    ipo (Azar et al. 2023, eq. 17):  (h - 1 / (2 * beta))^2, a squared loss that stops at a margin
        instead of pushing h to infinity on deterministic preferences.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}: expected sigmoid or ipo "
                         "(simpo and orpo have functions of their own)")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5):
    """SimPO (Meng et al. 2024, eq. 6), reference-free: (losses [B], chosen_rewards [B], rejected_rewards [B]).

    The reward is the length-normalised log-probability, r = beta / |y| * log pi(y|x), and the chosen
    answer must beat the rejected one by a margin gamma:  -log sigmoid(r_chosen - r_rejected - gamma).
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, lam=0.1):
    """ORPO (Hong et al. 2024, eqs. 4-7), no reference: (losses [B], chosen_rewards [B], rejected_rewards [B]).

    With P(y|x) = exp(log pi(y|x) / |y|), the per-token likelihood, and odds(y) = P / (1 - P):
        loss = NLL(chosen) + lam * -log sigmoid(log odds(chosen) - log odds(rejected))
    NLL(chosen) = -log pi(y_chosen|x) / |y_chosen| is SFT's loss on the chosen answer. The rewards
    logged are lam * log P, as TRL logs them. log(1 - P) is computed as log1p(-exp(log P)).
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
    # log odds = log P - log(1 - P); clamp keeps log1p(-exp(x)) finite where P rounds to 1
    log_odds = (chosen_avg - torch.log1p(-torch.exp(chosen_avg.clamp(max=-1e-6)))) \
        - (rejected_avg - torch.log1p(-torch.exp(rejected_avg.clamp(max=-1e-6))))
    losses = -chosen_avg - lam * F.logsigmoid(log_odds)
    return losses, (lam * chosen_avg).detach(), (lam * rejected_avg).detach()
