"""Distributed training helpers: process rank, metric averaging, DDP wrapping and sharded loaders.

The module-level `rank` and `world_size` are set by `init()` (from the environment Dora prepares for
`dora run -d`), so other modules can read them without touching `torch.distributed`. On a machine
without CUDA the gloo backend is used, so multi-process runs also work on CPU.
"""
import logging
import os
import pickle
import typing as tp

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.nn.parallel import DistributedDataParallel

from dora import distrib as dora_distrib

logger = logging.getLogger(__name__)

rank = 0
world_size = 1


def backend_name() -> str:
    """`nccl` when CUDA devices are available, `gloo` otherwise (CPU-only multi-process runs)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init() -> None:
    """Start the process group when several workers were launched, and set `rank`/`world_size`.

    A single process skips Dora's init, which would only log "world_size is 1, skipping init."
    (the first line `tools.export` and `tools.test_pretrained` printed)."""
    global rank, world_size
    spec = dora_distrib.get_distrib_spec()
    if spec.world_size == 1 and not os.environ.get("DORA_FORCE_DISTRIB") \
            and not torch.distributed.is_initialized():
        rank, world_size = 0, 1
        return
    dora_distrib.init(backend=backend_name())
    rank = dora_distrib.rank()
    world_size = dora_distrib.world_size()


def is_distributed() -> bool:
    """True when the process group is up and holds more than one worker."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return initialized and world_size > 1


def _reduce_device() -> torch.device:
    """Device the collective tensors must live on for the active backend."""
    return torch.device("cuda") if backend_name() == "nccl" else torch.device("cpu")


def average(metrics: tp.Union[tp.Dict[str, float], tp.List[float]],
            count: float = 1.) -> tp.Union[tp.Dict[str, float], tp.List[float]]:
    """Average `metrics` over all workers, each worker's values weighted by its `count`.

    Accepts a dict of floats (returns a dict with the same keys) or a list of floats.
    """
    if isinstance(metrics, dict):
        keys, values = zip(*sorted(metrics.items())) if metrics else ((), ())
        return dict(zip(keys, average(list(values), count)))
    if not is_distributed():
        return list(metrics)
    tensor = torch.tensor(list(metrics) + [1], device=_reduce_device(), dtype=torch.float64)
    tensor *= count
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return (tensor[:-1] / tensor[-1]).cpu().tolist()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap `model` in DistributedDataParallel when several workers train, else return it as is."""
    if not is_distributed():
        return model
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   output_device=device_ids[0] if device_ids else None)


def barrier() -> None:
    """Wait for every worker (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def close() -> None:
    """Once every worker got here, tear down the process group of a distributed run.

    Why: left to the interpreter's exit, gloo's threads can outlive the store of the first
    worker to exit, and the last worker then aborts ("terminate called without an active
    exception"): torchrun reports a failed run although training completed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    barrier()
    torch.distributed.destroy_process_group()


def share(obj: tp.Any = None, src: int = 0) -> tp.Any:
    """Send the picklable `obj` of worker `src` to every worker and return it everywhere."""
    if not is_distributed():
        return obj
    device = _reduce_device()
    size = torch.zeros(1, dtype=torch.long, device=device)
    if rank == src:
        payload = torch.tensor(list(pickle.dumps(obj)), dtype=torch.uint8, device=device)
        size[0] = len(payload)
    torch.distributed.broadcast(size, src=src)
    if rank != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    torch.distributed.broadcast(payload, src=src)
    if rank == src:
        return obj
    return pickle.loads(bytes(payload.cpu().tolist()))


def loader_workers(requested: int) -> int:
    """Data-loading worker processes for `misc.num_workers=requested`: at most one per CPU this
    process may run on (the limit torch's DataLoader itself recommends).

    Why: the default of 10 workers on a small machine only adds processes (about 50 MB each)
    that compete with training for the same cores. The data is the same whatever the count.
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    if requested > available:
        logger.info("Using %d data-loading workers instead of misc.num_workers=%d: this process "
                    "may use %d CPU(s).", available, requested, available)
        return available
    return requested


def loader(dataset: Dataset, *args, shuffle: bool = False, klass=DataLoader,
           **kwargs) -> DataLoader:
    """A data loader that gives each worker its own shard of `dataset`.

    With `shuffle`, a `DistributedSampler` is used (call `loader.sampler.set_epoch` for a new order
    each epoch); otherwise worker `r` sees items `r, r + world_size, ...` in order.
    """
    if not is_distributed():
        return klass(dataset, *args, shuffle=shuffle, **kwargs)
    if shuffle:
        sampler = DistributedSampler(dataset)
        return klass(dataset, *args, sampler=sampler, **kwargs)
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return klass(shard, *args, shuffle=False, **kwargs)
