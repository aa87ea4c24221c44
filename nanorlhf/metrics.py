"""What a run tells its user: messages on stderr, metrics.jsonl (and TensorBoard), a stop on a
loss or gradient that is no longer a number."""

import json
import math
import os
import sys

import torch

from nanorlhf import distributed as dist
from nanorlhf.errors import TrainingDiverged, UserError
from nanorlhf.files import atomic_write_text


def info(msg):
    if dist.is_main():  # under torchrun only rank 0 speaks
        sys.stderr.write(f"{msg}\n")  # one write: lines from two threads (ablate --jobs) stay whole
        sys.stderr.flush()


def check_finite(value, step, what="loss"):
    if not math.isfinite(value):
        raise TrainingDiverged(f"{what} is {value} at step {step}; the last good checkpoint is kept")


def tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report_to tensorboard needs tensorboard: pip install tensorboard") from None
    return SummaryWriter


def _logged_step(line):
    """The step of one metrics.jsonl line; a line cut short by a killed run counts as never logged."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


class Metrics:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl (and to TensorBoard with
    report_to="tensorboard"); close() draws output_dir/curves.png when matplotlib is installed."""

    def __init__(self, output_dir, resume_step=0, report_to="none"):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        self.enabled = dist.is_main()  # under torchrun only rank 0 writes (every rank logs the same numbers)
        if not self.enabled:
            return
        if report_to == "tensorboard":  # purge_step: a resumed run overwrites the steps it redoes
            self.writer = tensorboard_writer_class()(os.path.join(output_dir, "tensorboard"),
                                                     purge_step=resume_step + 1 if resume_step else None)
        if os.path.exists(self.path):  # a resumed run drops the lines logged after its checkpoint
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if resume_step and _logged_step(line) <= resume_step]
            atomic_write_text(self.path, "".join(kept))

    def log(self, step, **values):
        row = {"step": step, **{k: (float(v) if isinstance(v, (float, int, torch.Tensor)) else v)
                                for k, v in values.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.writer.add_scalar(k, v, step)
        return row

    def close(self):
        """Draw the learning curves into output_dir/curves.png (skipped without matplotlib) and
        close the TensorBoard writer. Call it once, when training ends."""
        from nanorlhf.plots import plot_run

        if not self.enabled:
            return
        plot_run(self.output_dir)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
