"""Atomic writes (nanorlhf.files), metrics.jsonl on resume (nanorlhf.metrics), checkpoints, RNG state and
the output dir (nanorlhf.checkpoint)."""

import os
import random

import numpy as np
import pytest
import torch

from nanorlhf.args import BaseArgs, parse_args, set_seed
from nanorlhf.checkpoint import (list_checkpoints, load_trainer_state, prepare_output_dir, rng_state, save_checkpoint,
                                 set_rng_state)
from nanorlhf.errors import UserError
from nanorlhf.files import atomic_save, atomic_write_text
from nanorlhf.metrics import Metrics


# ---------------------------------------------------------------- atomic writes and checkpoints

def write_files(files):
    def write(tmp):
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    return write


def test_atomic_save_replaces_files_and_leaves_no_tmp_dir(tmp_path):
    out = tmp_path / "model"
    atomic_save(str(out), write_files({"a.json": "old", "b.json": "old"}))
    atomic_save(str(out), write_files({"a.json": "new"}))
    assert (out / "a.json").read_text() == "new"
    assert (out / "b.json").read_text() == "old"  # a model dir keeps what it held (e.g. metrics.jsonl)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_save_replaces_a_checkpoint_dir_whole(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    atomic_save(str(ckpt), write_files({"a": "old", "b": "old"}))
    atomic_save(str(ckpt), write_files({"a": "new"}))
    assert sorted(os.listdir(ckpt)) == ["a"]
    assert (ckpt / "a").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]


def test_atomic_save_killed_while_writing_keeps_the_old_files(tmp_path):
    out = tmp_path / "model"
    atomic_save(str(out), write_files({"a": "old"}))

    def crash(tmp):
        write_files({"a": "half"})(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(str(out), crash)
    assert (out / "a").read_text() == "old"
    atomic_save(str(out), write_files({"a": "new"}))  # the next save clears the leftover temp dir
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_save_replaces_a_folder_from_an_earlier_save(tmp_path):
    out = tmp_path / "ppo"  # PPO's final save holds critic/; a rerun with --resume saves it again

    def write(text):
        def go(tmp):
            os.makedirs(os.path.join(tmp, "critic"))
            write_files({"head": text})(os.path.join(tmp, "critic"))
        return go

    atomic_save(str(out), write("old"))
    atomic_save(str(out), write("new"))
    assert (out / "critic" / "head").read_text() == "new"


def test_metrics_on_resume_keep_the_steps_up_to_the_checkpoint_and_drop_a_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # killed mid-write
    Metrics(str(tmp_path), resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def make_checkpoint(root, name, complete=True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "trainer_state.pt").write_bytes(b"")
    return str(path)


def test_list_checkpoints_sorts_by_step_and_ignores_tmp_and_incomplete_dirs(tmp_path):
    c2 = make_checkpoint(tmp_path, "checkpoint-2")
    c10 = make_checkpoint(tmp_path, "checkpoint-10")
    c9 = make_checkpoint(tmp_path, "checkpoint-9")
    make_checkpoint(tmp_path, ".tmp-checkpoint-12")
    make_checkpoint(tmp_path, "checkpoint-11", complete=False)
    make_checkpoint(tmp_path, "checkpoint-best")
    assert list_checkpoints(str(tmp_path)) == [c2, c9, c10]


def test_list_checkpoints_of_a_missing_dir_is_empty(tmp_path):
    assert list_checkpoints(str(tmp_path / "nope")) == []


def test_save_checkpoint_keeps_the_newest_save_total_limit(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, write_files({"w": str(step)}), {"x": torch.tensor(step)},
                           save_total_limit=2)
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-{n}") for n in (2, 3)]
    state = load_trainer_state(str(tmp_path / "checkpoint-3"))
    assert (state["step"], state["x"].item()) == (3, 3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


# ---------------------------------------------------------------- RNG state

def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip_gives_the_same_next_random_numbers():
    set_seed(123)
    draw()
    state = rng_state()
    expected = draw()
    draw()
    set_rng_state(state)
    assert draw() == expected


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    set_seed(7)
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = draw()
    set_seed(99)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert draw() == expected


def test_overwrite_output_dir_replaces_an_earlier_run_and_resume_keeps_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run; pass --resume to continue it, --overwrite_output_dir"):
        prepare_output_dir(str(out), resume=False)
    prepare_output_dir(str(out), resume=True)
    assert (out / "metrics.jsonl").exists()
    prepare_output_dir(str(out), resume=False, overwrite=True)
    assert out.is_dir() and not (out / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="pick one"):
        parse_args(BaseArgs, ["--resume", "--overwrite_output_dir"])


def test_atomic_write_text_killed_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    atomic_write_text(str(path), "old\n")

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(str(path), "new\n")
    assert path.read_text() == "old\n"
