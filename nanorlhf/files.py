"""Atomic writes, the one way nanorlhf writes what a reader may find: write under a temporary
name, then rename. A run killed at any moment leaves the old file or the new one, never half of one."""

import os
import re
import shutil

from nanorlhf import distributed as dist
from nanorlhf.errors import WRITE_ERRORS, SaveFailed


def atomic_write(path, write):
    """write(tmp_path) writes the file's contents; then tmp_path becomes `path` by one rename."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        _give_up(e, path, tmp)


def atomic_write_text(path, text):
    """A text file (UTF-8), whole or absent."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_save(final_dir, write):
    """Call write(tmp_dir), then move its files into final_dir by rename: a run killed at any
    moment leaves either the old files or the new ones, never half a file.

    Under torchrun every rank calls it: rank 0 writes, and no rank goes on until the files are there."""
    if not dist.is_main():
        dist.barrier()
        return
    _atomic_save(final_dir, write)
    dist.barrier()


def _atomic_save(final_dir, write):
    parent = os.path.dirname(os.path.abspath(final_dir))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except Exception as e:
        _give_up(e, final_dir, tmp)
    if os.path.basename(final_dir).startswith("checkpoint-"):
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)  # a whole checkpoint appears at once
        return
    os.makedirs(final_dir, exist_ok=True)
    # the file a loader looks for goes last: a dir that has it has everything else
    for name in sorted(os.listdir(tmp), key=lambda n: n in ("config.json", "adapter_config.json")):
        target = os.path.join(final_dir, name)
        if os.path.isdir(target):  # a folder (PPO's critic/) from an earlier save: rename cannot overwrite it
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def write_failure(error, folder):
    """Why a write failed, when the file system refused it (disk full, read-only, no permission), else
    None (a bug: let its traceback show). torch.save reports a full disk only as "unexpected pos": a
    disk with under 1 MiB free at that moment is taken to be the cause."""
    if isinstance(error, OSError):
        return error.strerror if error.errno in WRITE_ERRORS else None
    said = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(error))  # safetensors' wording
    if said:
        return said.group(1) if int(said.group(2)) in WRITE_ERRORS else None
    try:
        return "No space left on device" if shutil.disk_usage(folder).free < 2 ** 20 else None
    except OSError:
        return None


def _give_up(error, path, tmp):
    """A save that failed: remove its temporary copy, then report it (SaveFailed: one line, exit 4)."""
    cause = write_failure(error, os.path.dirname(tmp))  # before removing tmp frees the space
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        os.remove(tmp)
    if cause is None:
        raise error
    raise SaveFailed(f"{path}: could not save it ({cause}); the partial copy was removed, "
                     "earlier checkpoints are untouched") from None
