"""The DPO family (nanorlhf/dpo.py) against hand-computed values and a slow per-example version, and
train_dpo.py end to end on the tiny model."""

import json
import math
import os

import pytest
import torch
from conftest import DEMO, read_metrics
from transformers import AutoModelForCausalLM

from nanorlhf.dpo import dpo_loss, orpo_loss, sequence_logps, simpo_loss


def close(actual, expected, tol=1e-5):
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    assert actual == pytest.approx(expected, abs=tol)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- by hand

def test_dpo_sigmoid_by_hand():
    # h = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3; beta 0.1: loss = -log sigmoid(0.3)
    losses, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]),
                                        torch.tensor([-14.0]), beta=0.1)
    close(losses, [math.log1p(math.exp(-0.3))])  # 0.554355
    close(chosen, [0.2])
    close(rejected, [-0.1])


def test_policy_equal_to_reference_costs_log_2():
    losses, chosen, rejected = dpo_loss(torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -2.0]),
                                        torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -2.0]), beta=0.5)
    close(losses, [math.log(2)] * 2)
    close(chosen, [0.0, 0.0])
    close(rejected, [0.0, 0.0])


def test_conservative_dpo_by_hand():
    # h = 3, beta 0.1, label smoothing 0.25: 0.75 * -log sigmoid(0.3) + 0.25 * -log sigmoid(-0.3)
    losses, _, _ = dpo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]),
                            torch.tensor([-14.0]), beta=0.1, label_smoothing=0.25)
    close(losses, [0.75 * math.log1p(math.exp(-0.3)) + 0.25 * math.log1p(math.exp(0.3))])  # 0.6095


def test_ipo_by_hand():
    # h = 3, beta 0.1: (3 - 1 / 0.2)^2 = (3 - 5)^2 = 4; at h = 1 / (2 beta) the loss is 0
    # second pair: h = (-5 - -5) - (-10 - -5) = 5
    losses, _, _ = dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-15.0, -10.0]), torch.tensor([-12.0, -5.0]),
                            torch.tensor([-14.0, -5.0]), beta=0.1, loss_type="ipo")
    close(losses, [4.0, 0.0])


def test_simpo_by_hand():
    # chosen -6 over 3 tokens, rejected -12 over 4: rewards 2 * -2 = -4 and 2 * -3 = -6; margin 2 - gamma 0.5
    losses, chosen, rejected = simpo_loss(torch.tensor([-6.0]), torch.tensor([-12.0]), torch.tensor([3.0]),
                                          torch.tensor([4.0]), beta=2.0, gamma=0.5)
    close(losses, [math.log1p(math.exp(-1.5))])  # 0.201413
    close(chosen, [-4.0])
    close(rejected, [-6.0])


def test_orpo_by_hand():
    # per-token log-probs log(0.5) (chosen) and log(0.2) (rejected): odds 1 and 0.25, log odds ratio log 4;
    # loss = NLL of chosen (log 2) + 0.1 * -log sigmoid(log 4) = log 2 + 0.1 * log(1.25)
    losses, chosen, rejected = orpo_loss(torch.tensor([2 * math.log(0.5)]), torch.tensor([3 * math.log(0.2)]),
                                         torch.tensor([2.0]), torch.tensor([3.0]), lam=0.1)
    close(losses, [math.log(2) + 0.1 * math.log(1.25)])  # 0.715461
    close(chosen, [0.1 * math.log(0.5)])
    close(rejected, [0.1 * math.log(0.2)])


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, loss_type="kto")


# ---------------------------------------------------------------- against a slow per-example version

def random_logps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 0.5) for _ in range(4)]


def test_every_loss_matches_a_loop_per_example():
    pc, pr, rc, rr = random_logps(16, 0)
    lc, lr = torch.arange(1, 17, dtype=torch.float64), torch.arange(16, 0, -1, dtype=torch.float64)
    beta, ls, gamma, lam = 0.3, 0.1, 0.7, 0.2
    for i in range(16):
        h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
        expected = {"sigmoid": -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h),
                    "ipo": (h - 1 / (2 * beta)) ** 2}
        for loss_type, value in expected.items():
            losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type, ls if loss_type == "sigmoid" else 0.0)
            close(losses[i].item(), value, 1e-9)
        simpo = -log_sigmoid(beta * pc[i].item() / lc[i].item() - beta * pr[i].item() / lr[i].item() - gamma)
        close(simpo_loss(pc, pr, lc, lr, beta, gamma)[0][i].item(), simpo, 1e-9)
        p_chosen, p_rejected = math.exp(pc[i].item() / lc[i].item()), math.exp(pr[i].item() / lr[i].item())
        odds = (p_chosen / (1 - p_chosen)) / (p_rejected / (1 - p_rejected))
        orpo = -pc[i].item() / lc[i].item() - lam * log_sigmoid(math.log(odds))
        close(orpo_loss(pc, pr, lc, lr, lam)[0][i].item(), orpo, 1e-9)


def test_sequence_logps_sums_the_answer_tokens_only():
    """Hand case and a loop, for an empty answer, a full-length one and one that starts at the first token."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 5))
    labels = torch.tensor([[-100, -100, -100, -100, -100],  # no answer token at all
                           [-100, 1, 2, 3, 4],  # every predicted token is the answer's
                           [-100, -100, 5, -100, -100]])  # one token, then padding
    labels = torch.where(labels >= 0, ids, labels)
    logps, lengths = sequence_logps(logits, labels)
    assert lengths.tolist() == [0.0, 4.0, 1.0]
    for b in range(3):
        expected = sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
                       for t in range(1, 5) if labels[b, t] != -100)
        close(logps[b].item(), expected, 1e-6)
    assert logps[0].item() == 0.0


# ---------------------------------------------------------------- the script

PAIRS = ["--per_device_train_batch_size", 4, "--max_length", 128, "--lora_rank", 4, "--logging_steps", 1,
         "--eval_steps", 2, "--val_size", 0.2]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl"
    with open(os.path.join(DEMO, "rm.jsonl"), encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:20]), encoding="utf-8")
    return path


@pytest.mark.slow
def test_dpo_run_starts_at_log_2_logs_trls_names_and_merges(launcher, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    code, stderr = launcher.run("train_dpo.py", "--model", tiny_model_dir, "--data", pairs_file, "--output_dir", out,
                                "--max_steps", 4, "--learning_rate", 1e-3, *PAIRS)
    assert code == 0, stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "eval/loss", "eval/rewards/accuracies"):
        assert name in rows[-1], name
    # step 1 is measured before any update: the policy is the reference, every implicit reward is 0 (up to the
    # rounding of a batch padded to another width)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["rewards/margins"] > 0  # it learns to prefer the chosen answers
    adapter = json.load(open(out / "adapter_config.json"))
    assert adapter["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
    code, stderr = launcher.run("merge_lora.py", "--base", tiny_model_dir, "--adapter", out, "--output_dir",
                                tmp_path / "merged")
    assert code == 0, stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo"])
def test_every_loss_type_trains(loss_type, launcher, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / loss_type
    code, stderr = launcher.run("train_dpo.py", "--model", tiny_model_dir, "--data", pairs_file, "--output_dir", out,
                                "--max_steps", 2, "--loss_type", loss_type, *PAIRS)
    assert code == 0, stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_a_bad_loss_type_is_one_line(launcher, tiny_model_dir, pairs_file, tmp_path):
    code, stderr = launcher.run("train_dpo.py", "--model", tiny_model_dir, "--data", pairs_file,
                                "--output_dir", tmp_path / "x", "--loss_type", "kto")
    assert code == 2
    assert stderr == ("error: argument --loss_type: invalid choice: 'kto' (choose from 'sigmoid', 'ipo', "
                           "'simpo', 'orpo')\n")
    assert not (tmp_path / "x").exists()
