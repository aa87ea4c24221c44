"""nanorlhf.trace: one iteration of train_ppo.py, every number per token, agreeing with its metrics.jsonl."""

import json
import math
import shutil
import sys

import pytest
import torch
from conftest import DEMO

from nanorlhf.errors import UserError
from nanorlhf.trace import COLUMNS, main, token_cell, token_table, trace

RESPONSE_LENGTH = 8
FLAGS = ["--batch_size", 8, "--response_length", RESPONSE_LENGTH, "--ppo_epochs", 2, "--num_mini_batches", 2,
         "--seed", 0]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def policy_that_ends_early(tiny_model_dir, tmp_path_factory):
    """The tiny model with one token in twelve listed as an EOS (generation_config.eos_token_id): in one
    batch some responses end early and others run to --response_length."""
    out = tmp_path_factory.mktemp("ends_early") / "policy"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], *range(100, 1000, 12)]
    (out / "generation_config.json").write_text(json.dumps(config))
    return str(out)


def flags(policy, rm, *extra):
    return ["--sft", policy, "--rm", rm, "--data", f"{DEMO}/ppo.jsonl", *map(str, FLAGS), *map(str, extra)]


@pytest.fixture(scope="module")
def traced(policy_that_ends_early, rm_dir):
    """One iteration, traced: (args, t, comparison, tokenizer)."""
    return trace(flags(policy_that_ends_early, rm_dir))


def test_the_tables_totals_equal_the_logged_metrics_of_the_same_iteration(traced):
    _, _, comparison, _ = traced
    pairs = {name: (mine, logged) for name, _, mine, logged in comparison}
    for name in ("objective/kl", "objective/scores", "val/first_clipfrac"):  # the same reductions: exactly equal
        assert pairs[name][0] == pairs[name][1], name
    assert {"objective/rlhf_reward", "objective/non_score_reward", "val/first_approxkl", "policy/clipfrac_avg",
            "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"} <= set(pairs)
    for name, (mine, logged) in pairs.items():
        assert math.isclose(mine, logged, rel_tol=1e-6, abs_tol=1e-9), (name, mine, logged)


def test_each_sequences_rewards_sum_to_its_score_minus_the_kl_penalty(traced):
    _, t, _, _ = traced
    real = t["response_mask"] > 0
    kl = ((t["logprobs"] - t["ref_logprobs"]) * real).sum(1)
    expected = t["scores"] - t["kl_coef"] * kl
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(t["rewards"].sum(1).tolist(), expected.tolist()))


def test_the_per_token_loss_terms_average_to_the_loss_train_ppo_computed(traced):
    _, t, _, _ = traced
    for minibatch in t["minibatches"]:
        for micro in minibatch:
            tokens = (t["response_mask"][micro["row"]] > 0).sum()
            for term, stat in (("pg_loss", "pg_loss"), ("clipped", "clipfrac"), ("vf_loss", "vf_loss"),
                               ("vf_clipped", "vf_clipfrac")):
                assert math.isclose((micro[term].sum() / tokens).item(), micro["stats"][stat],
                                    rel_tol=1e-5, abs_tol=1e-7), term


def test_a_line_per_real_token_for_responses_that_end_early_and_that_run_to_the_limit(traced):
    args, t, _, tokenizer = traced
    lengths = (t["response_mask"] > 0).sum(1).tolist()
    assert min(lengths) < RESPONSE_LENGTH == max(lengths)  # both cases are in this batch
    first_minibatch = set(t["minibatches"][0][0]["row"].tolist())
    for row, n in enumerate(lengths):
        lines = token_table(t, row, 1, tokenizer)
        assert lines[2].split() == [name for name, _ in COLUMNS]
        token_lines, sum_line, after = lines[3:3 + n], lines[3 + n], lines[4 + n:]
        assert [line.split()[0] for line in token_lines] == [str(i) for i in range(n)]
        for line in token_lines:
            numbers = line.split()[-12:]  # logprob .. vf_loss: the token cell may hold spaces, these never do
            assert len(numbers) == 12 and not any(math.isnan(float(x)) for x in numbers[:8])
            assert (numbers[-4:] == ["-"] * 4) == (row not in first_minibatch)
        assert sum_line.split()[0] == "sum" and len(sum_line.split()) == 3
        assert ("ended at EOS" in lines[0]) == bool(t["ended"][row])
        if n < RESPONSE_LENGTH:  # ended early: its EOS is its last line, the padding after it is named
            assert t["ended"][row]
            assert token_cell(tokenizer.decode([int(t["response"][row, n - 1])]), 12).strip() in token_lines[-1]
            assert after == [f"(then {RESPONSE_LENGTH - n} padding tokens: mask 0, they add nothing to any sum "
                             "or loss)"]
        else:
            assert after == []
        assert all(len(line) <= 120 for line in lines)


def test_with_clamp_stop_advantage_the_traced_update_uses_no_negative_advantage_on_an_eos(
        policy_that_ends_early, rm_dir):
    """The same iteration with --clamp_stop_advantage: trace() checks its own clamped advantages against
    train_ppo.py's (it raises if they differ); the EOS tokens that had a negative advantage now have 0,
    every other token keeps its advantage."""
    def eos_of(t):
        lengths = (t["response_mask"] > 0).sum(1)
        return (torch.arange(t["response_mask"].shape[1]) == (lengths - 1).unsqueeze(1)) & t["ended"].unsqueeze(1)

    # Whitened, this toy's EOS advantages come out positive (the random RM's scores sit above its values);
    # unwhitened, they are score - V(before EOS) + the KL term: the first seed of 0-5 with a negative one
    for seed in range(6):
        args, plain, _, _ = trace(flags(policy_that_ends_early, rm_dir, "--no-whiten_advantages", "--seed", seed))
        if (plain["advantages"][eos_of(plain)] < 0).any():
            break
    is_eos, real = eos_of(plain), plain["response_mask"] > 0
    assert (plain["advantages"][is_eos] < 0).any(), "no batch of seeds 0-5 has an EOS with a negative advantage"
    _, clamped, comparison, _ = trace(flags(policy_that_ends_early, rm_dir, "--no-whiten_advantages",
                                            "--seed", args.seed, "--clamp_stop_advantage"))
    # the rollout is the same (same seed, the clamp acts after it), so the advantages before the clamp are too
    torch.testing.assert_close(clamped["adv_raw"], plain["adv_raw"])
    torch.testing.assert_close(clamped["advantages"][is_eos], plain["advantages"][is_eos].clamp(min=0))
    torch.testing.assert_close(clamped["advantages"][real & ~is_eos], plain["advantages"][real & ~is_eos])
    pairs = {name: (mine, logged) for name, _, mine, logged in comparison}
    assert all(math.isclose(mine, logged, rel_tol=1e-6, abs_tol=1e-9) for mine, logged in pairs.values())


def test_the_command_prints_the_tables_and_the_totals_of_a_later_iteration_and_draws_them(
        policy_that_ends_early, rm_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(flags(policy_that_ends_early, rm_dir, "--num_updates", 2, "--sequences", "5,2", "--minibatch", 3,
               "--plot", tmp_path / "trace.png"))
    out = capsys.readouterr().out
    assert out.index("sequence 5:") < out.index("sequence 2:")
    assert "iteration 2: 8 sequences" in out and "(step 2)" in out
    assert "objective/kl" in out and "<- differs" not in out
    assert (tmp_path / "trace.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("extra, message", [
    (["--sequences", "8"], "--sequences 8: rows of the batch, comma-separated, 0 to 7"),
    (["--sequences", "a,b"], "--sequences a,b: rows"),
    (["--minibatch", "5"], "--minibatch 5: an iteration has 4"),
])
def test_a_bad_trace_flag_is_one_line_before_anything_loads(extra, message):
    with pytest.raises(UserError, match=message):
        trace(flags("no-such-model", "no-such-rm", *extra))


def test_plot_without_matplotlib_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="--plot needs matplotlib"):
        trace(flags("no-such-model", "no-such-rm", "--plot", "x.png"))
