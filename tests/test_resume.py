"""Checkpoints under fire: a run killed with SIGKILL right after a checkpoint and resumed with
--resume ends bit-identical (on CPU) to a run never interrupted, for SFT, RM, DPO and PPO (LoRA, full, one base,
a reward function); Ctrl-C saves a checkpoint and exits cleanly; a diverged run stops and keeps its last good
checkpoint.

Every run goes through the real scripts, as forks of one process that imported them once (launcher.py).
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, demo_subset, read_metrics
from launcher import wait_for
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow

# lora_dropout > 0: every step draws random numbers, so a resume that restores the RNG wrongly shows.
# 10 dialogues and 20 pairs make 8 steps cross epochs: the data position must resume too.
SFT = ["--max_steps", 8, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2,
       "--max_length", 64, "--learning_rate", 1e-3, "--lora_rank", 4, "--lora_dropout", 0.1,
       "--logging_steps", 1]
RM = ["--max_steps", 8, "--per_device_train_batch_size", 4, "--max_length", 128, "--learning_rate", 1e-3,
      "--lora_rank", 4, "--lora_dropout", 0.1, "--logging_steps", 2, "--eval_steps", 4, "--val_size", 0.2,
      "--normalize_scores"]
# --target_kl: the adaptive KL coefficient is state the checkpoint must carry
# DPO with LoRA dropout too; --val_size: the held-out reference log-probs are state computed at start
DPO = ["--max_steps", 6, "--per_device_train_batch_size", 4, "--max_length", 128, "--learning_rate", 1e-3,
       "--lora_rank", 4, "--lora_dropout", 0.1, "--logging_steps", 2, "--eval_steps", 3, "--val_size", 0.2]
PPO = ["--num_updates", 5, "--batch_size", 4, "--response_length", 8, "--ppo_epochs", 2,
       "--num_mini_batches", 2, "--temperature", 1.0, "--lora_rank", 4, "--target_kl", 0.01,
       "--kl_horizon", 100, "--logging_steps", 1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A few records of each demo file: 10 dialogues (2.5 epochs of SFT), 20 pairs, 12 prompts."""
    return demo_subset(tmp_path_factory.mktemp("data"), {"sft.jsonl": 10, "rm.jsonl": 20, "ppo.jsonl": 12})


def stage_args(stage, tiny_model_dir, rm_dir, data, rm_adapter=None):
    ppo = ["train_ppo.py", "--sft", tiny_model_dir, "--rm", rm_dir, "--data", data / "ppo.jsonl", *PPO]
    return {"sft": ["train_sft.py", "--model", tiny_model_dir, "--data", data / "sft.jsonl", *SFT],
            "rm": ["train_rm.py", "--model", tiny_model_dir, "--data", data / "rm.jsonl", *RM],
            "dpo": ["train_dpo.py", "--model", tiny_model_dir, "--data", data / "rm.jsonl", *DPO],
            "ppo": ppo,
            "ppo full": [*ppo, "--finetuning_type", "full"],
            # the RM stage's LoRA adapter, trained on the same model: one base for all four roles
            "ppo one base": [*ppo[:4], rm_adapter, *ppo[5:]],
            # no reward model: the demo's gold rubric as a reward function, the critic on the SFT model
            "ppo reward_fn": [*ppo[:3], *ppo[5:], "--reward_fn", "nanorlhf.rewards:gold"]}[stage]


def final_weights(out):
    """Every safetensors file of the final save (policy, and for PPO the critic and value head)."""
    found = {}
    for folder, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(("checkpoint-", ".tmp-"))]
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(folder, name)
                found.update({f"{os.path.relpath(path, out)}:{k}": v for k, v in load_file(path).items()})
    return found


def checkpoints(out):
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_same_run(out, reference):
    ours, theirs = final_weights(out), final_weights(reference)
    assert ours.keys() == theirs.keys() and ours
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    assert read_metrics(out, timings=False) == read_metrics(reference, timings=False)
    for name in ("adapter_config.json", "nanorlhf_config.json"):  # RM --normalize_scores writes the second
        if os.path.exists(reference / name):
            assert read_json(out / name) == read_json(reference / name)


@pytest.fixture(scope="module")
def unbroken(launcher, tiny_model_dir, rm_dir, data, tmp_path_factory):
    """Each stage run once, never interrupted (and never checkpointed): the reference."""
    root, outs = tmp_path_factory.mktemp("unbroken"), {}
    for stage in ("sft", "rm", "dpo", "ppo", "ppo full", "ppo reward_fn", "ppo one base"):
        outs[stage] = root / stage.replace(" ", "-")
        code, stderr = launcher.run(*stage_args(stage, tiny_model_dir, rm_dir, data, outs.get("rm")),
                                    "--output_dir", outs[stage])
        assert code == 0, stderr
    assert "memory plan: one base (1 copy of the base weights" in stderr
    return outs


@pytest.mark.parametrize("stage,save_steps,kept",
                         [("sft", 3, 6), ("rm", 3, 6), ("dpo", 2, 4), ("ppo", 2, 4), ("ppo full", 2, 4),
                          ("ppo one base", 2, 4), ("ppo reward_fn", 2, 4)])
def test_killed_run_resumed_ends_bit_identical_to_an_unbroken_one(stage, save_steps, kept, launcher, unbroken,
                                                                   tiny_model_dir, rm_dir, data, tmp_path):
    """SIGKILL right after checkpoint-<save_steps> appears, then --resume (--save_total_limit 1)."""
    out = tmp_path / stage.replace(" ", "-")
    cmd = [*stage_args(stage, tiny_model_dir, rm_dir, data, unbroken["rm"]), "--output_dir", out,
           "--save_steps", save_steps, "--save_total_limit", 1]
    pid = launcher.start(*cmd)
    wait_for(out / f"checkpoint-{save_steps}" / "trainer_state.pt")
    os.kill(pid, signal.SIGKILL)
    code, _ = launcher.wait()
    assert code == -signal.SIGKILL  # killed before it could finish
    code, stderr = launcher.run(*cmd, "--resume")
    assert code == 0, stderr
    assert f"resumed from {out / f'checkpoint-{save_steps}'}" in stderr
    assert_same_run(out, unbroken[stage])
    assert checkpoints(out) == [f"checkpoint-{kept}"]  # --save_total_limit 1; the end is the final save


def test_ctrl_c_saves_a_checkpoint_of_the_current_step_and_resume_continues(launcher, unbroken, data,
                                                                            tiny_model_dir, rm_dir, tmp_path):
    out = tmp_path / "sft"
    cmd = [*stage_args("sft", tiny_model_dir, rm_dir, data), "--output_dir", out, "--save_steps", 2]
    pid = launcher.start(*cmd)
    wait_for(out / "checkpoint-2" / "trainer_state.pt")
    os.kill(pid, signal.SIGINT)
    code, stderr = launcher.wait()
    assert code == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"interrupted: saved checkpoint-(\d+) in {re.escape(str(out))}; "
                         "continue with --resume", last)
    assert match, stderr
    step = int(match.group(1))
    assert 2 <= step < 8 and checkpoints(out)[-1] == f"checkpoint-{step}"
    assert read_metrics(out, timings=False)[-1]["step"] == step  # the checkpoint holds the step it was at
    assert not os.path.exists(out / "adapter_model.safetensors")  # no final model
    code, stderr = launcher.run(*cmd, "--resume")
    assert code == 0, stderr
    assert_same_run(out, unbroken["sft"])


def test_diverged_run_stops_with_exit_3_and_keeps_the_last_checkpoint(launcher, tiny_model_dir, rm_dir, data,
                                                                      tmp_path):
    out = tmp_path / "sft"
    code, stderr = launcher.run(*stage_args("sft", tiny_model_dir, rm_dir, data), "--output_dir", out,
                                "--save_steps", 1, "--learning_rate", 1e30)  # one step: weights ~1e30
    assert code == 3 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("error: training diverged: loss is nan at step 2; "
                                               "the last good checkpoint is kept")
    assert checkpoints(out) == ["checkpoint-1"]
    assert {"trainer_state.pt", "adapter_model.safetensors", "adapter_config.json"} <= set(
        os.listdir(out / "checkpoint-1"))
    assert not os.path.exists(out / "adapter_model.safetensors")  # no final model


def test_reward_model_scoring_nan_stops_ppo_with_exit_3(launcher, tiny_model_dir, rm_dir, data, tmp_path):
    nan_rm = tmp_path / "nan-rm"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(nan_rm)
    AutoTokenizer.from_pretrained(rm_dir).save_pretrained(nan_rm)
    out = tmp_path / "ppo"
    code, stderr = launcher.run(*stage_args("ppo", tiny_model_dir, str(nan_rm), data),
                                "--output_dir", out)
    assert code == 3 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("error: training diverged: the reward model's score is nan "
                                               "at step 1; the last good checkpoint is kept")
    assert not os.path.exists(out / "adapter_model.safetensors")


def test_resume_skips_damaged_checkpoints_and_continues_bit_identical_from_the_newest_whole_one(
        launcher, unbroken, tiny_model_dir, rm_dir, data, tmp_path):
    out = tmp_path / "sft"
    cmd = [*stage_args("sft", tiny_model_dir, rm_dir, data), "--output_dir", out, "--save_steps", 2,
           "--save_total_limit", 0]
    code, stderr = launcher.run(*cmd)
    assert code == 0, stderr
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:  # a disk error: the header's first bytes overwritten, the size unchanged
        f.write(b"\xff" * 8)
    cut = out / "checkpoint-4" / "trainer_state.pt"
    size = cut.stat().st_size
    os.truncate(cut, size // 2)  # a copy cut short
    code, stderr = launcher.run(*cmd, "--resume")
    assert code == 0, stderr
    assert f"--resume: skipping {out / 'checkpoint-6'}: does not load: " in stderr
    assert f"--resume: skipping {out / 'checkpoint-4'}: trainer_state.pt has {size // 2} bytes, {size} when saved" \
        in stderr
    assert f"resumed from {out / 'checkpoint-2'} (step 2)" in stderr
    assert_same_run(out, unbroken["sft"])

    for name in checkpoints(out):  # every checkpoint cut short: nothing to resume from
        os.truncate(out / name / "adapter_model.safetensors", 10)
    code, stderr = launcher.run(*cmd, "--resume")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {out}: no whole checkpoint to resume from: "
                                                      "checkpoint-6 (adapter_model.safetensors has 10 bytes, ")


# python -c FULL_DISK script args: the script as __main__, with a torch.save that finds the disk full at checkpoint-4
FULL_DISK = """
import errno, runpy, sys, torch
save = torch.save
def full_disk(obj, path, *args, **kwargs):
    if "checkpoint-4" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return save(obj, path, *args, **kwargs)
torch.save = full_disk
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_while_checkpointing_stops_with_exit_4_and_resume_continues(launcher, unbroken, tiny_model_dir,
                                                                                rm_dir, data, tmp_path):
    """The script runs in a process whose torch.save refuses checkpoint-4's trainer state with ENOSPC (a fresh
    interpreter: a fork of this one, which has run torch's thread pool, can hang)."""
    out = tmp_path / "sft"
    cmd = [*stage_args("sft", tiny_model_dir, rm_dir, data), "--output_dir", out, "--save_steps", 2]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, os.path.join(ROOT, cmd[0]), *map(str, cmd[1:])],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"})
    status, stderr = proc.returncode, proc.stderr
    assert status == 4 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoint-4'}: could not save it (No space left on device); the partial copy was removed, "
        "earlier checkpoints are untouched")
    assert checkpoints(out) == ["checkpoint-2"] and not [n for n in os.listdir(out) if n.startswith(".tmp")]
    code, stderr = launcher.run(*cmd, "--resume")  # space again: the run goes on from checkpoint-2
    assert code == 0 and f"resumed from {out / 'checkpoint-2'}" in stderr, stderr
    assert_same_run(out, unbroken["sft"])
