"""A run's output dir and its checkpoints: saving the model, checkpoint-STEP/ with everything a loop
needs to go on exactly where it stopped, one resume for every stage, Ctrl-C, and `Run`, the
bookkeeping every stage's loop shares (so the loop itself stays visible in the script).

    output_dir/checkpoint-STEP/   the weights (PEFT adapter or safetensors) + trainer_state.pt
                                  (optimizer, scheduler, RNG states, step, whatever else the loop carries)
                                  + manifest.json (every file's size, written last)

A checkpoint appears whole, by one rename. What can still go wrong later (a copy cut short, a disk
error) the manifest shows: --resume skips a checkpoint whose files do not match it, or that fails to
load, says which and why, and resumes from the newest whole one.
"""

import glob
import json
import os
import random
import shutil
import signal

import numpy as np
import torch
from safetensors.torch import load_file

from nanorlhf import distributed as dist
from nanorlhf.args import set_seed
from nanorlhf.errors import Interrupted, UserError
from nanorlhf.files import atomic_save
from nanorlhf.lora import load_adapter, save_adapter
from nanorlhf.metrics import Metrics, info
from nanorlhf.training import micro_batches


def prepare_output_dir(output_dir, resume, overwrite=False):
    """Create the output dir; refuse to mix a fresh run into a directory that holds another run
    (metrics.jsonl or a checkpoint), or with overwrite, delete that run first."""
    if not output_dir:
        raise UserError("--output_dir is required")
    holds_run = os.path.exists(os.path.join(output_dir, "metrics.jsonl")) or bool(list_checkpoints(output_dir))
    if holds_run and not resume:
        if not overwrite:
            raise UserError(f"{output_dir}: already holds a run; pass --resume to continue it, "
                            "--overwrite_output_dir to replace it, or choose another dir")
        if dist.is_main():
            info(f"--overwrite_output_dir: deleting the earlier run in {output_dir}")
            shutil.rmtree(output_dir)
        dist.barrier()
    os.makedirs(output_dir, exist_ok=True)


def save_model(model, tokenizer, out_dir, lora, base_path="", task_type="CAUSAL_LM", modules_to_save=None,
               adapter=None):
    """A LoRA run saves a PEFT adapter (`adapter`: which one, default the active one); a full run a
    transformers model dir (safetensors). The tokenizer beside it, unless None."""
    os.makedirs(out_dir, exist_ok=True)
    if lora:
        save_adapter(model, out_dir, base_model_name_or_path=base_path, task_type=task_type,
                     modules_to_save=modules_to_save, adapter=adapter)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_weights(model, path, lora, adapter="default"):
    """Load what save_model wrote into an existing model: a PEFT adapter (as `adapter`), or full safetensors."""
    if lora:
        return load_adapter(model, path, adapter=adapter)
    state = {}  # model.safetensors, or its shards model-0000k-of-0000n (PPO's critic/ also holds value_head)
    for f in sorted(glob.glob(os.path.join(path, "model*.safetensors"))):
        state.update(load_file(f, device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embeddings
        raise UserError(f"{path}: checkpoint does not match the model ({(missing + unexpected)[:3]})")
    return model


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(trainer_state):
    """Restore this process's random state from a checkpoint (under torchrun: this rank's own)."""
    states = trainer_state.get("rng_per_rank") or [trainer_state["rng"]]
    if len(states) == dist.world_size():
        set_rng_state(states[dist.rank()])
    else:  # saved by another number of processes: give each rank a stream of its own
        info(f"the checkpoint was saved by {len(states)} process(es), this run has {dist.world_size()}: "
             "random streams restart, so the run will not match an uninterrupted one exactly")
        set_seed(1000 * trainer_state["step"] + dist.rank())


def save_checkpoint(output_dir, step, save_weights, trainer_state, save_total_limit=2):
    """output_dir/checkpoint-STEP/: the weights (save_weights(dir)), and trainer_state.pt holding
    optimizer, scheduler, RNG states and whatever else the loop needs to resume exactly.
    Under torchrun every rank calls it; rank 0 writes, with every rank's RNG state in "rng_per_rank"."""
    rng = rng_state()
    if dist.world_size() > 1:
        trainer_state = {**trainer_state, "rng_per_rank": dist.gather(rng)}

    def write(tmp):
        save_weights(tmp)
        torch.save({**trainer_state, "rng": rng, "step": step}, os.path.join(tmp, "trainer_state.pt"))
        write_manifest(tmp)

    atomic_save(os.path.join(output_dir, f"checkpoint-{step}"), write)
    if save_total_limit > 0 and dist.is_main():
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (a half-written one is only ever a .tmp-* dir)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        name = os.path.basename(path)[len("checkpoint-"):]
        if name.isdigit() and os.path.isfile(os.path.join(path, "trainer_state.pt")):
            found.append((int(name), path))
    return [p for _, p in sorted(found)]


MANIFEST = "manifest.json"


def write_manifest(folder):
    """folder/manifest.json: the size of every file in folder (and its subfolders), written last."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)


def damage(folder):
    """Why a checkpoint's files do not match its manifest (a phrase), or None if they do. A checkpoint
    saved before manifests existed has none: loading it is then the only check."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(sizes, dict):
        return f"{MANIFEST} is unreadable"
    for name, size in sorted(sizes.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} when saved"
    return None


def load_trainer_state(checkpoint_dir):
    # weights_only=True: our own file, but never unpickle arbitrary objects.
    return torch.load(os.path.join(checkpoint_dir, "trainer_state.pt"), weights_only=True)


class CtrlC:
    """From creation until restore(), Ctrl-C (SIGINT) asks the training loop to stop after the current
    step rather than at once: a step cut in half (inside optimizer.step(), say) would leave a state no
    checkpoint should hold. The loop checks `pressed` after each step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        info("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def restore(self):
        signal.signal(signal.SIGINT, self._previous)

    def save_or_stop(self, step, steps, save_steps, output_dir, checkpoint):
        """After each optimizer step: call checkpoint() every save_steps steps (not at the last one,
        the final save covers it), and if Ctrl-C was pressed on any rank, save and stop (exit 130).
        Every rank decides together, so they all stop at the same step."""
        stop = dist.any_rank(self.pressed)
        if stop or (save_steps > 0 and step % save_steps == 0 and step < steps):
            checkpoint()
        if stop:
            raise Interrupted(f"saved checkpoint-{step} in {output_dir}; continue with --resume")


def resume(output_dir, load_weights, state):
    """Load the newest whole checkpoint: load_weights(checkpoint_dir) for the weights, then every object
    in `state` (name -> something with load_state_dict: optimizer, scheduler, KL controller) and this
    process's random state. A checkpoint that does not match its manifest or fails to load is skipped,
    with a line saying why. Returns (step, trainer_state); (0, {}) when there is none."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        info(f"--resume: no checkpoint in {output_dir}, starting from scratch")
        return 0, {}
    skipped = []
    for path in reversed(checkpoints):
        why = damage(path)
        if why is None:
            try:
                trainer_state = load_trainer_state(path)
                load_weights(path)
                for name, obj in state.items():
                    obj.load_state_dict(trainer_state[name])
                break
            except Exception as e:  # damage its sizes do not show (bytes overwritten), or another run's files
                why = f"does not load: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}"
        info(f"--resume: skipping {path}: {why}")
        skipped.append(f"{os.path.basename(path)} ({why})")
    else:
        raise UserError(f"{output_dir}: no whole checkpoint to resume from: {'; '.join(skipped)}")
    restore_rng(trainer_state)
    info(f"resumed from {path} (step {trainer_state['step']})")
    return trainer_state["step"], trainer_state


class Run:
    """What every stage's loop does besides training: the output dir, resume, metrics, the progress
    bar, checkpoints every --save_steps and on Ctrl-C, and the final save.

        run = Run(args, world, steps, "sft", save_weights, load_weights, optimizer=..., scheduler=...)
        with run:                                # Ctrl-C: finish the step, save, stop
            for step, micro in run.steps(len(data), global_batch, accumulation):   # from a resumed step on
                ... one optimizer step on the micro-batches ...
                run.metrics.log(step, ...)
                run.end_step(step, loss=...)     # progress bar; a checkpoint when one is due
        run.finish(model)                        # metrics plot, the final model in output_dir

    save_weights(dir) writes the model; load_weights(checkpoint_dir) reads it back; `state` names the
    objects a checkpoint holds besides the weights (anything with state_dict / load_state_dict).
    """

    def __init__(self, args, world, steps, desc, save_weights, load_weights, **state):
        prepare_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
        self.args, self.world, self.total = args, world, steps
        self.save_weights, self.state = save_weights, state
        self.step, self.trainer_state = resume(args.output_dir, load_weights, state) if args.resume else (0, {})
        self.metrics = Metrics(args.output_dir, resume_step=self.step, report_to=args.report_to)
        self.bar = dist.progress_bar(world, total=steps, initial=self.step, desc=desc, dynamic_ncols=True)
        self.ctrl_c = None

    def __enter__(self):
        self.ctrl_c = CtrlC()
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.ctrl_c.restore()
        self.bar.close()
        if exc_type is not None and dist.is_main() and os.path.isdir(self.args.output_dir) \
                and not os.listdir(self.args.output_dir):
            os.rmdir(self.args.output_dir)  # stopped before it wrote anything: leave no empty output dir

    def steps(self, n_examples, batch_size, micro_per_step=1):
        """The loop's optimizer steps, from where a resumed run stopped to the last: yields (step, micro),
        step counted from 1, micro the step's micro_per_step micro-batches of the data, each (epoch, indices)
        (training.micro_batches: batch_size is global under torchrun)."""
        batches = micro_batches(n_examples, batch_size, self.args.seed, skip=self.step * micro_per_step,
                                world_size=self.world.size)
        while self.step < self.total:
            micro = [next(batches) for _ in range(micro_per_step)]
            self.step += 1
            yield self.step, micro

    def log_window(self, step, window, evaluate=None, **values):
        """Log the mean of each statistic over `window` (the steps since the last log line), `values`, and
        evaluate()'s held-out metrics when given; returns the row. A resumed run logs the same means, since
        the window goes into its checkpoints (end_step's extra)."""
        row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        row.update(values)
        if evaluate is not None:
            row.update(evaluate())
            info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval/")))
        self.metrics.log(step, **row)
        return row

    def checkpoint(self, step, **extra):
        """output_dir/checkpoint-STEP: the weights, every object in `state`, and `extra` (plain values)."""
        save_checkpoint(self.args.output_dir, step, self.save_weights,
                        {**{name: obj.state_dict() for name, obj in self.state.items()}, **extra},
                        self.args.save_total_limit)

    def end_step(self, step, extra=None, **postfix):
        """After each optimizer step: the progress bar, and a checkpoint every --save_steps or on Ctrl-C
        (then stop). `extra`: what else this step's checkpoint must hold to resume exactly."""
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})
        self.ctrl_c.save_or_stop(step, self.total, self.args.save_steps, self.args.output_dir,
                                 lambda: self.checkpoint(step, **(extra or {})))

    def finish(self, trained, message=None):
        """Draw the curves, check the ranks agree (torchrun), write the final model into output_dir."""
        self.metrics.close()  # curves.png (with matplotlib), closes TensorBoard
        dist.check_same_weights(trained)  # under torchrun: stop if the ranks ever fell out of sync
        atomic_save(self.args.output_dir, self.save_weights)
        info(message or f"saved to {os.path.abspath(self.args.output_dir)}")
