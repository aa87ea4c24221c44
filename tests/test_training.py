"""The parts of a training loop every stage shares (nanorlhf.training): the schedule, the data order
on resume, the token-mean loss under gradient accumulation, the number of steps."""

import itertools
import math

import pytest
import torch

from nanorlhf.args import BaseArgs
from nanorlhf.training import lm_forward_loss_sum, lm_loss_sum, micro_batches, total_steps, warmup_cosine


# ---------------------------------------------------------------- the schedule

def lr_factors(total_steps, warmup_ratio, steps):
    """The lr multiplier in effect at each of `steps` (after that many scheduler.step() calls)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps, warmup_ratio)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_is_linear_up_to_the_peak():
    # 100 steps, 10% warmup = 10 steps: 1/10, 2/10, ... 10/10
    assert lr_factors(100, 0.1, [0, 1, 4, 9]) == pytest.approx({0: 0.1, 1: 0.2, 4: 0.5, 9: 1.0})


def test_cosine_decays_from_the_peak_to_a_tenth():
    # after warmup, progress = (step - 10) / 90; factor = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    assert lr_factors(100, 0.1, [10, 55, 100, 130]) == pytest.approx({10: 1.0, 55: 0.55, 100: 0.1, 130: 0.1})
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2
    assert lr_factors(40, 0.0, [10])[10] == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)


def test_no_warmup_starts_at_the_peak():
    assert lr_factors(10, 0.0, [0])[0] == 1.0


def test_warmup_is_at_least_one_step():
    assert lr_factors(10, 0.03, [0, 1]) == pytest.approx({0: 1.0, 1: 1.0})  # int(0.3) -> 1 step of warmup


# ---------------------------------------------------------------- data order

def take(generator, n):
    return list(itertools.islice(generator, n))


def test_micro_batches_cover_every_example_once_per_epoch():
    batches = take(micro_batches(10, 4, seed=0), 6)  # 3 per epoch: sizes 4, 4, 2
    assert [epoch for epoch, _ in batches] == [0, 0, 0, 1, 1, 1]
    assert [len(idx) for _, idx in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (0, 1):
        assert sorted(sum((idx for e, idx in batches if e == epoch), [])) == list(range(10))


def test_micro_batches_reshuffle_every_epoch_and_depend_on_the_seed():
    batches = take(micro_batches(50, 50, seed=0), 2)
    assert batches[0][1] != batches[1][1]
    assert take(micro_batches(50, 50, seed=1), 1)[0][1] != batches[0][1]


@pytest.mark.parametrize("skip", [0, 1, 2, 3, 7])
def test_micro_batches_skip_k_resumes_where_the_first_k_left_off(skip):
    full = take(micro_batches(10, 4, seed=5), skip + 6)
    assert take(micro_batches(10, 4, seed=5, skip=skip), 6) == full[skip:]


# ---------------------------------------------------------------- the loss

def test_lm_loss_sum_is_the_summed_next_token_cross_entropy_over_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 6, 0, -100]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):  # the logits at t predict the token at t + 1
            target = labels[b, t + 1].item()
            if target != -100:
                expected += -torch.log_softmax(logits[b, t], -1)[target].item()
                count += 1
    loss_sum, n = lm_loss_sum(logits, labels)
    assert n.item() == count == 5
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_lm_loss_sum_ignores_minus_100_whatever_the_logits_there():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[3, 1, -100, 2]])
    changed = logits.clone()
    changed[0, 1] = 100.0  # the logits predicting the ignored position 2
    assert lm_loss_sum(changed, labels)[0].item() == \
        pytest.approx(lm_loss_sum(logits, labels)[0].item())


def test_lm_loss_sum_does_not_score_the_first_label():
    logits = torch.zeros(1, 3, 4)
    assert lm_loss_sum(logits, torch.tensor([[1, -100, -100]]))[1].item() == 0
    assert lm_loss_sum(logits, torch.tensor([[-100, 1, -100]]))[1].item() == 1


def accumulated_grad(model, micro_batches):
    """The scripts' recipe: sum each micro-batch's loss, divide by the tokens of the whole step."""
    model.zero_grad()
    n_tokens = sum((labels[:, 1:] != -100).sum().item() for _, labels in micro_batches)
    for ids, labels in micro_batches:
        loss_sum, _ = lm_loss_sum(model(ids), labels)
        (loss_sum / n_tokens).backward()
    return model.weight.grad.clone()


class Bigram(torch.nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, ids):
        return self.weight[ids]


def test_gradient_accumulation_equals_one_big_batch_token_mean():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 1, 2], [3, 5, 7, 9, 2, 4]])
    labels = ids.clone()
    labels[0, :5] = -100  # 1 labelled target in row 0, 5 in rows 1 and 2: micro-batch means would differ
    model = Bigram()
    big = accumulated_grad(model, [(ids, labels)])
    accumulated = accumulated_grad(model, [(ids[:1], labels[:1]), (ids[1:], labels[1:])])
    assert torch.allclose(accumulated, big, atol=1e-7)

    # the naive recipe (mean of per-micro-batch means) is a different gradient: the test can tell
    model.zero_grad()
    for x, y in [(ids[:1], labels[:1]), (ids[1:], labels[1:])]:
        loss_sum, n = lm_loss_sum(model(x), y)
        (loss_sum / n / 2).backward()
    assert not torch.allclose(model.weight.grad, big, atol=1e-4)


def test_total_steps_from_epochs_and_accumulation():
    args = BaseArgs(num_train_epochs=2.0, gradient_accumulation_steps=4)
    assert total_steps(args, batches_per_epoch=10) == 5  # ceil(10 * 2 / 4)
    assert total_steps(BaseArgs(max_steps=3), batches_per_epoch=10) == 3


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("case", ["prompts of different lengths", "every token labelled (PT)", "no label",
                                  "only the last token", "a label in column 1"])
def test_lm_forward_loss_sum_equals_the_loss_over_every_logit(case):
    model = tiny_llama()
    ids = torch.randint(1, 23, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # row 2 right-padded
    labels = ids.clone()
    if case == "prompts of different lengths":
        labels[0, :4], labels[1, :6], labels[2, :3] = -100, -100, -100
        labels[2, 7:] = -100
    elif case == "no label":
        labels[:] = -100
    elif case == "only the last token":
        labels[:, :-1] = -100
    elif case == "a label in column 1":
        labels[:, :8] = -100
        labels[1, 1] = ids[1, 1]
    elif case != "every token labelled (PT)":
        raise AssertionError(case)
    kept = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: kept.append(out.size(1)))
    got, n = lm_forward_loss_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    hook.remove()
    want, want_n = lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert n.item() == want_n.item() == int((labels[:, 1:] != -100).sum())
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    first = {"prompts of different lengths": 3, "every token labelled (PT)": 1, "no label": 9,
             "only the last token": 8, "a label in column 1": 1}[case]  # the first labelled column
    assert kept == [9 - first + 1]  # the logits from the one that predicts it on (no label: one, unused)
