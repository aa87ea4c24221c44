"""nanorlhf.ablate: the presets are valid train_ppo.py flags; a tiny grid end to end, and its reuse."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO, ROOT

from nanorlhf import ablate as ablate_module
from nanorlhf.ablate import DPO_VARIANTS, VARIANTS, markdown_table, mean_curve, summarize
from nanorlhf.args import parse_args
from nanorlhf.errors import UserError

TINY = ["--num_updates", 1, "--batch_size", 4, "--response_length", 8, "--ppo_epochs", 1, "--logging_steps", 1]


def load_script(name="train_ppo"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_preset_is_valid_train_ppo_flags_and_keeps_the_responses_per_iteration():
    train_ppo = load_script()
    baseline = parse_args(train_ppo.Args, [])
    for name, flags in VARIANTS.items():
        args = parse_args(train_ppo.Args, flags)
        changed = {k for k, v in vars(args).items() if v != getattr(baseline, k)}
        assert changed or name == "baseline", name
        assert args.batch_size == baseline.batch_size and args.batch_size % args.num_samples_per_prompt == 0
    assert parse_args(train_ppo.Args, VARIANTS["no_kl"]).kl_coef == 0
    assert parse_args(train_ppo.Args, VARIANTS["rloo"]).num_samples_per_prompt == 4
    train_dpo = load_script("train_dpo")
    assert {name: parse_args(train_dpo.Args, flags).loss_type for name, flags in DPO_VARIANTS.items()} == {
        "dpo": "sigmoid", "simpo": "simpo", "ipo": "ipo", "orpo": "orpo"}


def test_the_demos_ppo_flags_are_valid_train_ppo_flags():
    """scripts/demo_ppo_flags.sh as bash reads it (demo.sh and demo_seeds.sh source it): a typo there would
    only show in make demo, minutes in."""
    listed = subprocess.run(["bash", "-c", 'source scripts/demo_ppo_flags.sh && printf "%s\\n" "${PPO_FLAGS[@]}"'],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    args = parse_args(load_script().Args, listed)
    assert (args.num_updates, args.response_length, args.missing_eos_penalty) == (20, 96, 5)
    assert args.clamp_stop_advantage


def test_summary_is_mean_and_sd_over_seeds_and_the_curve_a_seed_mean():
    results = [{"rm_score": 1.0, "wall_s": 10.0}, {"rm_score": 3.0, "wall_s": 20.0}, {"diverged": "nan"}]
    row = summarize("no_kl", results)
    assert (row["rm_score"], row["rm_score_sd"], row["seeds"], row["diverged"]) == (2.0, 2 ** 0.5, 3, 1)
    assert "| no_kl | `--kl_coef 0` | 2.000 ± 1.414 | – |" in markdown_table([row])
    curve = mean_curve([[{"step": 1, "objective/scores": 1.0}, {"step": 2, "objective/scores": 3.0}],
                        [{"step": 1, "objective/scores": 2.0}]])
    assert curve == [{"step": 1, "objective/scores": 1.5}]  # only the steps every seed logged


def test_unknown_variant_is_one_clear_error(tiny_model_dir, monkeypatch):
    with pytest.raises(UserError, match="choose from baseline, no_kl"):
        ablate(monkeypatch, "--sft", tiny_model_dir, "--rm", tiny_model_dir, "--data", f"{DEMO}/ppo.jsonl",
               "--variants", "baseline,no_such")


def ablate(monkeypatch, *args):
    """Run the grid in this process (its training and evaluation runs are subprocesses)."""
    monkeypatch.setattr(sys, "argv", ["ablate", *map(str, args)])
    ablate_module.main()


@pytest.mark.slow
def test_grid_writes_the_table_and_reuses_finished_runs(tiny_model_dir, rm_dir, tmp_path, monkeypatch, capsys,
                                                        forked_stages):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # on a busy 2-core machine threads slow a tiny model ~10x
    out = tmp_path / "ablate"
    argv = ["--sft", tiny_model_dir, "--rm", rm_dir, "--data", f"{DEMO}/ppo.jsonl", "--eval_data", f"{DEMO}/test.jsonl",
            "--output_dir", out, "--seeds", 1, "--variants", "baseline,grpo,dpo", "--eval_max_new_tokens", 4,
            "--pairs", f"{DEMO}/rm_test.jsonl",
            "--dpo_args", "--max_steps 2 --per_device_train_batch_size 2 --val_size 0", "--jobs", 2,
            "--eval_checkpoints", "--", *TINY, "--num_updates", 2, "--save_steps", 1, "--save_total_limit", 0]
    ablate(monkeypatch, *argv)
    table = (out / "results.md").read_text(encoding="utf-8").splitlines()
    variants = [line.split("|")[1].strip() for line in table if line.startswith("| ")][1:]
    assert variants == ["baseline", "grpo", "dpo"]
    assert table[4].endswith("| 1 | 8 responses |") and table[6].endswith("| 1 | 4 pairs |")  # budgets stated
    summary = json.loads((out / "results.json").read_text())["summary"]
    for row in summary:
        assert {"rm_score", "gold", "kl_to_sft", "response_length", "wall_s"} <= set(row)
    grpo = json.loads((out / "grpo" / "seed-1" / "result.json").read_text())
    assert grpo["flags"][-4:] == ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "4"]
    assert (out / "grpo" / "seed-1" / "adapter_model.safetensors").exists()
    # --eval_checkpoints: the SFT model (step 0), checkpoint-1, and the final policy, which is the run's result
    points = grpo["checkpoints"]
    assert [p["step"] for p in points] == [0, 1, 2] and points[0]["kl_to_sft"] == 0
    final = ("gold", "rm_score", "kl_to_sft")
    assert {k: points[-1][k] for k in final} == {k: grpo[k] for k in final}
    dpo = json.loads((out / "dpo" / "seed-1" / "result.json").read_text())
    assert [p["step"] for p in dpo["checkpoints"]] == [0, 2]  # no checkpoints saved: SFT and the final model
    if importlib.util.find_spec("matplotlib"):  # the grid's curves, and each run's own
        assert (out / "curves.png").exists() and (out / "grpo" / "seed-1" / "curves.png").exists()
        assert (out / "overoptimization.png").exists()
    markers = {v: (out / v / "seed-1" / "result.json").stat().st_mtime_ns for v in ("baseline", "grpo", "dpo")}
    logs = {v: (out / v / "seed-1" / "train.log").stat().st_mtime_ns for v in ("baseline", "grpo", "dpo")}

    capsys.readouterr()

    def no_run(argv, log):
        raise AssertionError(f"started {argv[:2]}")

    monkeypatch.setattr(ablate_module, "run_command", no_run)
    ablate(monkeypatch, *argv)  # an interrupted or repeated grid: finished runs are not run again
    assert capsys.readouterr().err.count("reused (finished before)") == 3
    assert markers == {v: (out / v / "seed-1" / "result.json").stat().st_mtime_ns for v in markers}
    assert logs == {v: (out / v / "seed-1" / "train.log").stat().st_mtime_ns for v in logs}
    assert (out / "results.md").read_text(encoding="utf-8").splitlines() == table
    with pytest.raises(UserError, match="ran with other flags"):  # never mix runs of two settings
        ablate(monkeypatch, *argv, "--kl_coef", 0.1)
