"""Several processes, one training run: torch.distributed under `torchrun`, nothing of our own.

    torchrun --nproc_per_node 2 train_sft.py --model ... --data ... --output_dir ...

Each process (rank) holds a full copy of the trained modules and sees its own share of every
global batch; DistributedDataParallel (DDP) averages the gradients in backward, so every rank takes
the same optimizer step. Losses are normalised by the *global* token count, so a step is the same
maths as one process with the same global batch. Only rank 0 logs, shows progress and writes files;
the others wait at a barrier while it saves.

Without torchrun (no WORLD_SIZE > 1 in the environment) every function here is the identity or a
no-op, so `python train_X.py` runs exactly as it would without this module.
"""

import atexit
import dataclasses
import os
import sys

import torch
import torch.distributed as dist


@dataclasses.dataclass
class World:
    """Who this process is: rank of size; device is the --device to use (this rank's GPU on CUDA)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "auto"

    @property
    def enabled(self):
        return self.size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_arg="auto"):
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA; each
    rank takes the GPU numbered by its LOCAL_RANK). With one process: World(device=device_arg)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device_arg)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if use_cuda:
        device_arg = f"cuda:{local_rank}"
        torch.cuda.set_device(device_arg)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(cleanup)
    return World(rank, size, local_rank, device_arg)


def _active():
    return dist.is_available() and dist.is_initialized()


def is_main():
    """Rank 0, or the only process: the one that logs and writes (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def rank():
    return dist.get_rank() if _active() else 0


def world_size():
    return dist.get_world_size() if _active() else 1


def _device():
    """Where collectives want their tensors: the GPU with nccl, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(x):
    """x (a tensor or a Python number) summed over all ranks; x itself with one process."""
    if not _active():
        return x
    if isinstance(x, torch.Tensor):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x
    total = torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64, device=_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item()


def mean_over_ranks(values):
    """{name: number} averaged over the ranks, in one all-reduce; `values` itself with one process.
    Each rank computed its numbers on an equal share of the batch, so their mean is the batch's."""
    if not _active():
        return values
    total = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return dict(zip(values, (total / dist.get_world_size()).tolist(), strict=True))


def any_rank(flag):
    """True on every rank when it is True on any: ranks must agree to stop (Ctrl-C) at the same step."""
    return bool(sum_over_ranks(int(flag)))


def barrier():
    if _active():
        dist.barrier()


def gather(obj):
    """[rank 0's obj, rank 1's, ...] on every rank (any picklable object); [obj] with one process."""
    if not _active():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(indices, world):
    """This rank's share of a global micro-batch: every world.size-th example, from its rank.
    (micro_batches(..., world_size) makes every global micro-batch a multiple of it: equal shares.)"""
    return indices[world.rank::world.size]


def wrap(module, world):
    """DistributedDataParallel around the trained module under torchrun: calling it runs the module's
    forward, and backward then averages the gradients of its trainable parameters over the ranks.
    DDP only syncs what runs through that forward. With one process: the module itself."""
    if not world.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def check_same_weights(module):
    """Under torchrun, stop if the ranks' trainable weights differ (DDP gives every rank the same
    gradients, so they must not): a float64 sum and sum of squares per parameter, compared exactly.
    Nothing with one process."""
    if not _active():
        return
    params = [p.detach() for p in module.parameters() if p.requires_grad]
    local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differ:
        raise RuntimeError(f"the weights of ranks {differ} differ from rank 0's: the ranks fell out of sync")
    if is_main():
        print(f"the trained weights are identical on all {len(gathered)} ranks", file=sys.stderr, flush=True)


def progress_bar(world, **kwargs):
    """tqdm on rank 0 only (where the TQDM_* environment variables still apply)."""
    from tqdm import tqdm

    return tqdm(**kwargs) if world.is_main else tqdm(disable=True, **kwargs)


def cleanup():
    if _active():
        dist.destroy_process_group()
