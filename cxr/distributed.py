"""Several processes, one model: PyTorch's DistributedDataParallel, set up from torchrun.

torchrun starts the processes and tells each one RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE (and where the rendezvous is). Without torchrun those are absent: the world is
one process, no process group is made and every helper here is a no-op, so `python
stages/train.py` runs exactly the single-process code it always ran.

The backend follows the device: NCCL between GPUs (one per process, `cuda:LOCAL_RANK`), gloo
between CPU processes. CXR_DIST_BACKEND overrides the choice (gloo on GPUs for a test on one card).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cxr.errors import InputError
from cxr.infer import cpu_threads, pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among all of them; the default is a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=pick_device)

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, logs and writes every file."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def part(self) -> slice:
        """This rank's share of a global batch: every size-th image from its rank on."""
        return slice(self.rank, None, self.size)


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{key} must be a whole number (set by torchrun), got {raw!r}") from None


def world_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int, int]:
    """rank, size, local rank, local size from torchrun's variables (a world of one without)."""
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    local_size = _env_int(env, "LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise InputError(
            f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={size} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}"
        )
    return rank, size, local_rank, local_size


def backend_for(device: torch.device, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("CXR_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")


def die_with_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Under torchrun (Linux), have the kernel end this process when torchrun dies.

    After a `kill -9` of torchrun its workers would otherwise live on, orphaned, finishing the
    run and writing the outputs while a re-run writes them too.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0


def init(env: Mapping[str, str] | None = None) -> World:
    """Join the process group torchrun describes; a world of one joins nothing."""
    die_with_launcher(env)
    rank, size, local_rank, local_size = world_from_env(env)
    if size == 1:
        return World()
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count() and backend_for(pick_device(), env) == "nccl":
            raise InputError(
                f"{local_size} processes on this node but {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend_for(device, env), rank=rank, world_size=size)
    log.debug("rank %d of %d on %s (%s)", rank, size, device, dist.get_backend())
    return World(rank, size, local_rank, local_size, device)


@contextlib.contextmanager
def session(env: Mapping[str, str] | None = None) -> Iterator[World]:
    """The process group for the length of a `with` block, torn down even after an error."""
    world = init(env)
    try:
        yield world
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def threads_per_process(threads: int, world: World) -> int:
    """`threads` if set, else this process's share of the cores (and of CXR_JOBS's share):
    two processes with two threads each on two cores spin against each other."""
    return threads or max(1, cpu_threads(0) // world.local_size)


def check_batch(batch_size: int, world: World, where: str = "batch_size") -> int:
    """The per-process batch: `batch_size` is the global batch, split evenly across ranks."""
    if batch_size % world.size:
        raise InputError(
            f"{where} is the global batch ({batch_size}) and must be divisible by the number "
            f"of processes ({world.size})"
        )
    return batch_size // world.size


def wrap(model: nn.Module, world: World, *, sync_batchnorm: bool = False) -> nn.Module:
    """The module to train: `model` itself for one process, else DDP around it.

    `model` stays the plain module (its state_dict has no `module.` prefix) and shares every
    parameter and buffer with the wrapper. SyncBatchNorm replaces BatchNorm inside `model` in
    place; `plain_batchnorm` undoes that after training.
    """
    if not world.distributed:
        return model
    if sync_batchnorm:
        if world.device.type == "cpu":
            raise InputError(
                "sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                "set it to false for CPU processes"
            )
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP keeps parameters identical and, before each forward, gives every rank rank 0's
    # buffers (BatchNorm running statistics); gradients are averaged over ranks.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Turn SyncBatchNorm layers back into BatchNorm2d (same parameters and buffers), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, device=child.running_mean.device)  # fmt: skip
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            plain_batchnorm(child)
    return module


def _collective_device(world: World) -> torch.device:
    return world.device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: list[float], world: World) -> list[float]:
    """Element-wise sums over all ranks (float64): counts and loss totals of one epoch."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(world))
    dist.all_reduce(t)
    return t.tolist()


def from_main(values: list[float], world: World) -> list[float]:
    """Rank 0's values on every rank: one decision (best epoch, early stop) for all of them."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(world))
    dist.broadcast(t, src=0)
    return t.tolist()


def object_from_main(obj: Any, world: World) -> Any:
    """Rank 0's object (a resume state it read) on every rank, without a shared disk."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device(world))
    return box[0]


def sync_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's BatchNorm running statistics on every rank.

    DDP keeps the parameters identical; the running statistics of plain BatchNorm are each
    rank's own after its last batch. Rank 0's are the ones validated and saved, so after this
    every rank holds exactly the model rank 0 holds.
    """
    if world.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
