"""distrib: single-process no-ops, and a real 2-process gloo group (average, share, loaders)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from demucs import distrib


def test_single_process_is_a_no_op():
    distrib.init()
    assert (distrib.rank, distrib.world_size) == (0, 1)
    assert distrib.average({"a": 1., "b": 3.}, 5) == {"a": 1., "b": 3.}
    assert distrib.share({"x": 1}) == {"x": 1}
    model = torch.nn.Linear(2, 2)
    assert distrib.wrap(model) is model
    loader = distrib.loader(list(range(5)), batch_size=2)
    assert isinstance(loader, DataLoader) and len(loader) == 3
    distrib.barrier()
    distrib.close()  # no process group: nothing to tear down


@pytest.mark.parametrize("cpus, requested, expected", [(2, 10, 2), (2, 2, 2), (2, 0, 0),
                                                       (16, 10, 10), (1, 4, 1)])
def test_loader_workers_are_capped_at_the_usable_cpus(monkeypatch, caplog, cpus, requested,
                                                      expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    with caplog.at_level("INFO", logger="demucs.distrib"):
        assert distrib.loader_workers(requested) == expected
    capped = f"Using {cpus} data-loading workers instead of misc.num_workers={requested}"
    assert (capped in caplog.text) == (expected < requested)


def test_backend_is_gloo_without_cuda():
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert distrib.backend_name() == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from demucs.train import main
    xp = main.get_xp([])
    with xp.enter():
        distrib.init()
    averaged = distrib.average({"loss": float(rank + 1)}, count=rank + 1)
    shared = distrib.share({"from": rank} if rank == 1 else None, src=1)
    ordered = [int(x) for batch in distrib.loader(list(range(7)), batch_size=2) for x in batch]
    shuffled = [int(x) for batch in distrib.loader(list(range(8)), batch_size=2, shuffle=True)
                for x in batch]
    wrapped = type(distrib.wrap(torch.nn.Linear(2, 2))).__name__
    distrib.close()
    closed = not torch.distributed.is_initialized()
    queue.put((rank, distrib.world_size, averaged, shared, ordered, shuffled, wrapped, closed))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_gloo_group(tmp_path, monkeypatch):
    monkeypatch.setenv("_DORA_TEST_PATH", str(tmp_path))
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for rank, world_size, averaged, shared, ordered, shuffled, wrapped, closed in results:
        assert world_size == 2 and closed
        # weighted by count: (1*1 + 2*2) / (1 + 2)
        assert averaged["loss"] == pytest.approx(5 / 3)
        assert shared == {"from": 1}
        assert ordered == list(range(rank, 7, 2))
        assert wrapped == "DistributedDataParallel"
    assert sorted(results[0][5] + results[1][5]) == list(range(8))
