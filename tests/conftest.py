"""What several test modules share: the tiny model built once per session by the real train_pt.py, a
random reward model, running the stage scripts (as a subprocess, or forked from the launcher), a few
records of the demo data, reading metrics.jsonl. Test modules import from here, never from each other."""

import json
import os
import runpy
import subprocess
import sys
import traceback

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


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """Runs the stage scripts as forks of one process that has imported them once (tests/launcher.py)."""
    from launcher import Launcher

    launcher = Launcher(str(tmp_path_factory.mktemp("stderr")))
    yield launcher
    launcher.close()


@pytest.fixture
def forked_stages(launcher, monkeypatch):
    """nanorlhf.ablate's commands (ablate's, exercises' and make real's runs) forked from the launcher."""
    from nanorlhf import ablate

    monkeypatch.setattr(ablate, "run_command", launcher.run_command)


def run_as_main(script, args, stderr_path, stdout_too=False):
    """In a fork: `python script args` (`python -m module args` for "-m module") with stderr to a file, and with
    stdout_too stdout as well; never returns."""
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.dup2(err if stdout_too else os.open(os.devnull, os.O_WRONLY), 1)
    sys.argv, code = [script, *args], 0
    try:
        if script.startswith("-m "):
            runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:  # as the interpreter treats it: an int is the status, anything else is printed
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def other_tokenizer_model(folder):
    """A tiny model whose tokenizer was trained with another vocabulary size: the same text, other ids."""
    from nanorlhf.tiny import build_tiny_model, train_tokenizer

    with open(os.path.join(DEMO, "pt.txt"), encoding="utf-8") as f:
        tokenizer = train_tokenizer(f.read().splitlines()[:300], vocab_size=1000)
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def demo_subset(root, counts):
    """The first n records of demo files into root: {"sft.jsonl": 10, ...}; returns root."""
    for name, n in counts.items():
        with open(os.path.join(DEMO, name), encoding="utf-8") as f:
            (root / name).write_text("".join(f.readlines()[:n]), encoding="utf-8")
    return root


def read_metrics(out, timings=True):
    """The rows of out/metrics.jsonl; without the wall-clock time/* entries unless timings."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows if timings else [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]
