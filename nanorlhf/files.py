"""Atomic writes, the one way nanorlhf writes what a reader may find: write under a temporary
name, then rename. A run killed at any moment leaves the old file or the new one, never half of one."""

import os
import shutil

from nanorlhf import distributed as dist


def atomic_write(path, write):
    """write(tmp_path) writes the file's contents; then tmp_path becomes `path` by one rename."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    write(tmp)
    os.replace(tmp, path)


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
    os.makedirs(tmp)
    write(tmp)
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
