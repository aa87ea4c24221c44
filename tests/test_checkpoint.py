"""Atomic writes (nanorlhf.files), metrics.jsonl on resume (nanorlhf.metrics), checkpoints, RNG state and
the output dir (nanorlhf.checkpoint)."""

import errno
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from nanorlhf.args import BaseArgs, parse_args, set_seed
from nanorlhf.checkpoint import (damage, list_checkpoints, load_trainer_state, prepare_output_dir, resume, rng_state,
                                 save_checkpoint, set_rng_state)
from nanorlhf.errors import SaveFailed, UserError, run_main
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


# ---------------------------------------------------------------- damaged checkpoints

def linear_checkpoints(out, steps):
    """A Linear model and its optimizer checkpointed at each step (weights = the step number)."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        optimizer.step()  # some optimizer state to save
        save_checkpoint(str(out), step, lambda d: torch.save(model.state_dict(), os.path.join(d, "w.pt")),
                        {"optimizer": optimizer.state_dict()}, save_total_limit=0)
    return model, optimizer


def resume_linear(out):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    load = lambda d: model.load_state_dict(torch.load(os.path.join(d, "w.pt"), weights_only=True))  # noqa: E731
    step, _ = resume(str(out), load, {"optimizer": optimizer})
    return step, model.weight[0, 0].item()


def test_manifest_tells_a_whole_checkpoint_from_one_cut_short_or_missing_a_file(tmp_path):
    linear_checkpoints(tmp_path, [1])
    ckpt = tmp_path / "checkpoint-1"
    assert sorted(os.listdir(ckpt)) == ["manifest.json", "trainer_state.pt", "w.pt"]
    assert damage(str(ckpt)) is None
    size = (ckpt / "w.pt").stat().st_size
    os.truncate(ckpt / "w.pt", size - 10)
    assert damage(str(ckpt)) == f"w.pt has {size - 10} bytes, {size} when saved"
    (ckpt / "w.pt").unlink()
    assert damage(str(ckpt)) == "w.pt is missing"
    (ckpt / "manifest.json").write_text("{cut")
    assert damage(str(ckpt)) == "manifest.json is unreadable"
    (ckpt / "manifest.json").unlink()
    assert damage(str(ckpt)) is None  # saved before manifests: loading it is the check


def test_resume_skips_damaged_checkpoints_for_the_newest_whole_one(tmp_path, capsys):
    linear_checkpoints(tmp_path, [1, 2, 3])
    os.truncate(tmp_path / "checkpoint-3" / "w.pt", 100)  # a copy cut short
    state = tmp_path / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # overwritten in place: its size still matches
    assert resume_linear(tmp_path) == (1, 1.0)
    err = capsys.readouterr().err
    assert f"--resume: skipping {tmp_path / 'checkpoint-3'}: w.pt has 100 bytes," in err
    assert f"--resume: skipping {tmp_path / 'checkpoint-2'}: does not load: " in err
    assert f"resumed from {tmp_path / 'checkpoint-1'} (step 1)" in err
    (tmp_path / "checkpoint-1" / "w.pt").unlink()
    with pytest.raises(UserError, match=r"no whole checkpoint to resume from: checkpoint-3 \(w.pt has 100 bytes.*"
                                        r"checkpoint-2 \(does not load: .*checkpoint-1 \(w.pt is missing\)$"):
        resume_linear(tmp_path)


# ---------------------------------------------------------------- a disk that refuses

@pytest.fixture(params=["tmpfs", "patched"])
def tiny_tmpfs(request, tmp_path):
    """A 1 MiB tmpfs (root on Linux can mount one; skipped where this machine does not allow it), or None:
    then the test's writer raises ENOSPC itself."""
    if request.param == "patched":
        yield None
        return
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if not mounted:
        pytest.skip("this machine does not let the tests mount a tmpfs (the patched writer covers it)")
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)  # -l: torch may still hold the failed file


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_the_earlier_ones(writer, tiny_tmpfs,
                                                                                     tmp_path):
    """On a real full file system (a tiny tmpfs) where one can be mounted, and with a writer raising ENOSPC."""
    from safetensors.torch import save_file

    out = tiny_tmpfs or tmp_path
    small, big = torch.zeros(1000), torch.zeros(400_000)  # 4 KB, then 1.6 MB: more than the tmpfs holds

    def weights(tensor):
        def write(folder):
            if tiny_tmpfs is None and tensor is big:
                raise OSError(errno.ENOSPC, "No space left on device")
            if writer == "torch.save":
                torch.save({"w": tensor}, os.path.join(folder, "w.pt"))
            else:
                save_file({"w": tensor}, os.path.join(folder, "w.safetensors"))
        return write

    save_checkpoint(str(out), 1, weights(small), {"x": small}, save_total_limit=0)
    with pytest.raises(SaveFailed) as failed:
        save_checkpoint(str(out), 2, weights(big), {"x": small}, save_total_limit=0)
    assert str(failed.value) == (f"{out / 'checkpoint-2'}: could not save it (No space left on device); the partial "
                                 "copy was removed, earlier checkpoints are untouched")
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no .tmp-checkpoint-2 left
    assert damage(str(out / "checkpoint-1")) is None


def test_a_read_only_or_forbidden_folder_is_one_line_with_exit_4(tmp_path, monkeypatch, capsys):
    def forbidden(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", forbidden)
    with pytest.raises(SaveFailed, match=r"checkpoint-3: could not save it \(Permission denied\); the partial copy"):
        atomic_save(str(tmp_path / "checkpoint-3"), write_files({"a": "x"}))

    def read_only_output_dir():
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")

    with pytest.raises(SystemExit) as exited:
        run_main(read_only_output_dir)
    assert exited.value.code == 4 and capsys.readouterr().err == "error: /mnt/ro/run: Read-only file system\n"
    with pytest.raises(FileNotFoundError):  # not the file system refusing: a traceback as before
        run_main(lambda: open(tmp_path / "no such file"))


def test_a_bug_while_saving_still_shows_its_traceback(tmp_path):
    def buggy(tmp):
        raise TypeError("not a disk problem")

    with pytest.raises(TypeError):
        atomic_save(str(tmp_path / "checkpoint-1"), buggy)
    assert os.listdir(tmp_path) == []


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
