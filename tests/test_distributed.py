"""Several processes under torchrun (DDP, gloo on CPU): a step is the same maths as one process with
the same global batch, the ranks stay in sync, only rank 0 writes, and --resume works.

The end-to-end tests run `python -m torch.distributed.run --standalone --nproc_per_node 2` on the tiny
model and compare with one process given the same global batch (per_device_train_batch_size halved
for two processes; PPO's --batch_size is global already). The rest checks the pieces in-process.
"""

import functools
import itertools
import os
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import ROOT, demo_subset, read_metrics
from safetensors.torch import load_file

from nanorlhf import distributed as dist
from nanorlhf.args import set_seed
from nanorlhf.checkpoint import restore_rng, rng_state
from nanorlhf.ppo import explained_variance, masked_mean, masked_whiten
from nanorlhf.training import batch_order, batches_per_epoch, micro_batches

# ---------------------------------------------------------------- the pieces, in one process


class ThreadSum:
    """An all-reduce for threads standing in for ranks: every caller gets the sum of all callers' tensors."""

    def __init__(self, n):
        self.barrier, self.lock, self.parts = threading.Barrier(n), threading.Lock(), []

    def __call__(self, x):
        with self.lock:
            self.parts.append(x)
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)
        if self.barrier.wait() == 0:
            self.parts = []
        self.barrier.wait()
        return total


def on_two_ranks(fn, *halves):
    """fn(*first halves, reduce) and fn(*second halves, reduce), run as two 'ranks' in threads."""
    reduce, results = ThreadSum(2), [None, None]

    def rank(r):
        results[r] = fn(*[h[r] for h in halves], reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def whiten(x, mask, reduce, shift_mean):
    return masked_whiten(x, mask, shift_mean, reduce=reduce)


def test_whitening_with_reduce_over_two_shards_is_whitening_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 5, 2, 4])[:, None]).float()
    halves = [(t[:3], t[3:]) for t in (x, mask)]
    for shift_mean in (True, False):
        parts = on_two_ranks(functools.partial(whiten, shift_mean=shift_mean), *halves)
        assert torch.allclose(torch.cat(parts), masked_whiten(x, mask, shift_mean), atol=1e-6)
    means = on_two_ranks(lambda a, m, reduce: masked_mean(a, m, reduce=reduce), *halves)
    assert torch.allclose(means[0], masked_mean(x, mask)) and torch.equal(means[0], means[1])
    returns = x.flip(0)
    ev = on_two_ranks(lambda v, r, m, reduce: explained_variance(v, r, m, reduce=reduce),
                      *halves[:1], (returns[:3], returns[3:]), halves[1])
    assert torch.allclose(ev[0], explained_variance(x, returns, mask), atol=1e-6)


def test_micro_batches_split_evenly_and_follow_the_one_process_order():
    n, per_device, world_size = 11, 2, 2
    gen = micro_batches(n, per_device * world_size, seed=3, world_size=world_size)
    epoch0 = [idx for _, idx in (next(gen) for _ in range(3))]
    assert [len(b) for b in epoch0] == [4, 4, 2]  # 11 - 11 % 2 = 10 examples: the last one left out
    assert list(itertools.chain(*epoch0)) == batch_order(n, 3, 0)[:10]  # the one-process order
    assert batches_per_epoch(n, 4, world_size) == 3
    for idx in epoch0:  # equal shares, which together are the global micro-batch
        shares = [dist.shard(idx, dist.World(rank=r, size=2)) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) and sorted(itertools.chain(*shares)) == sorted(idx)
    assert next(gen)[0] == 1  # then the next epoch


def test_a_single_process_needs_no_torchrun_and_changes_nothing():
    world = dist.setup("cpu")
    assert world == dist.World(device="cpu") and not world.enabled and world.is_main
    module = torch.nn.Linear(2, 2)
    assert dist.wrap(module, world) is module
    x = torch.ones(3)
    assert dist.sum_over_ranks(x) is x and dist.sum_over_ranks(5) == 5
    assert dist.mean_over_ranks({"a": 1.5}) == {"a": 1.5} and dist.any_rank(True) is True
    assert dist.shard([4, 5, 6], world) == [4, 5, 6] and dist.gather("x") == ["x"]


def test_each_rank_resumes_its_own_random_state(monkeypatch):
    states = []
    for seed in (1, 2):
        set_seed(seed)
        states.append(rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # rank 1's next numbers
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    restore_rng({"rng": states[0], "rng_per_rank": states, "step": 3})
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- end to end, two processes

ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
SFT = ["--max_steps", 2, "--gradient_accumulation_steps", 2, "--max_length", 128, "--learning_rate", 1e-3,
       "--lora_rank", 4, "--logging_steps", 1, "--save_steps", 1]
# temperature 0 (greedy) and one minibatch per epoch: the two runs sample the same responses and
# every optimizer step sees the whole batch, so they must agree to float rounding
PPO = ["--num_updates", 2, "--batch_size", 4, "--response_length", 8, "--ppo_epochs", 2,
       "--num_mini_batches", 1, "--temperature", 0, "--lora_rank", 4, "--logging_steps", 1, "--save_steps", 1]


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"torchrun {script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stderr


def one_process(launcher, script, *args):
    status, stderr = launcher.run(script, *args)
    assert status == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("data"), {"sft.jsonl": 16, "ppo.jsonl": 12})


def files(out):
    """Every file under out, relative to it: what a run wrote."""
    return sorted(os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out)
                  for name in names)


def weights(out):
    found = {}
    for path in files(out):
        if path.endswith(".safetensors") and not path.startswith("checkpoint-"):
            found.update({f"{path}:{k}": v for k, v in load_file(os.path.join(out, path)).items()})
    return found


def assert_close(ours, theirs, names):
    for name in names:
        relative = abs(ours[name] - theirs[name]) / max(1e-3, abs(theirs[name]))
        assert relative < 1e-3, (name, ours[name], theirs[name])


def assert_same_weights(out, reference, atol):
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys() and ours
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= atol


def assert_only_rank_0_wrote(out, reference, stderr):
    """The same files as one process wrote (nothing from rank 1), one metrics line per step, and the
    ranks' weights identical at the end (checked in the run by an all-gather)."""
    assert files(out) == files(reference)
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(reference)]
    assert "the trained weights are identical on all 2 ranks" in stderr
    assert stderr.count("saved to") + stderr.count("saved the policy to") == 1  # only rank 0 speaks


@pytest.mark.slow
def test_sft_on_two_processes_is_one_process_with_the_same_global_batch(launcher, tiny_model_dir, data,
                                                                        tmp_path):
    common = ["--model", tiny_model_dir, "--data", data / "sft.jsonl", *SFT]
    one_process(launcher, "train_sft.py", *common, "--per_device_train_batch_size", 4,
                "--output_dir", tmp_path / "one")
    stderr = torchrun("train_sft.py", *common, "--per_device_train_batch_size", 2,
                      "--output_dir", tmp_path / "two")
    ours, theirs = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    for row, reference in zip(ours, theirs, strict=True):  # step 1: the same loss; step 2: the same update
        assert_close(row, reference, ["loss"])
    assert_same_weights(tmp_path / "two", tmp_path / "one", atol=1e-5)
    assert_only_rank_0_wrote(tmp_path / "two", tmp_path / "one", stderr)
    state = torch.load(tmp_path / "two" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2  # every rank's random state, for --resume


@pytest.mark.slow
def test_ppo_on_two_processes_is_one_process_and_resumes_bit_identically(launcher, tiny_model_dir, rm_dir,
                                                                          data, tmp_path):
    # the reward model and a reward function (the gold rubric) together: each rank scores its own share
    common = ["--sft", tiny_model_dir, "--rm", rm_dir, "--data", data / "ppo.jsonl", *PPO,
              "--reward_fn", "nanorlhf.rewards:gold", "--reward_fn_weight", 0.5]
    one_process(launcher, "train_ppo.py", *common, "--output_dir", tmp_path / "one")
    stderr = torchrun("train_ppo.py", *common, "--output_dir", tmp_path / "two")
    # (not objective/kl: at iteration 1 it is rounding noise around 0, the policy being the reference)
    names = ["objective/scores", "objective/rm_scores", "objective/fn_scores", "loss/policy_avg",
             "loss/value_avg", "val/explained_variance", "val/response_length", "episodes"]
    for row, reference in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
        assert_close(row, reference, names)  # iteration 2 also: the same update in between
    assert_same_weights(tmp_path / "two", tmp_path / "one", atol=1e-5)
    assert_only_rank_0_wrote(tmp_path / "two", tmp_path / "one", stderr)

    # --resume under torchrun: from checkpoint-1, both ranks end exactly where the unbroken run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-1", resumed / "checkpoint-1")
    shutil.copy(tmp_path / "two" / "metrics.jsonl", resumed / "metrics.jsonl")
    torchrun("train_ppo.py", *common, "--output_dir", resumed, "--resume")
    assert_same_weights(resumed, tmp_path / "two", atol=0.0)
    assert read_metrics(resumed, timings=False) == read_metrics(tmp_path / "two", timings=False)
