"""Shared fixtures: a tiny model built once per test session by the real train_pt.py."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")


def run_script(script, *args, check=True, timeout=600):
    """Run one of the stage scripts as a user would; returns the CompletedProcess."""
    # One thread: the tiny models are too small for two to help, and a fixed thread count keeps
    # float results (and so the resume bit-identity tests) the same from run to run.
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-architecture model + SentencePiece tokenizer, pretrained a few steps on the demo corpus."""
    out = tmp_path_factory.mktemp("tiny") / "pt"
    run_script("train_pt.py", "--data", os.path.join(DEMO, "pt.txt"), "--output_dir", out, "--max_steps", 8,
               "--per_device_train_batch_size", 8, "--seed", 0)
    return str(out)


@pytest.fixture(scope="session")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A reward model: the tiny LM's backbone with a random scalar head, saved as transformers does."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = str(tmp_path_factory.mktemp("rm"))
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out
