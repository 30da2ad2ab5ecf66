"""The shared-memory gradient all-reduce (cnn.dist.SharedMemoryAllReduce) against gloo, in real
processes: the same averages, buckets it cannot take handed to gloo, a rank that never arrives,
and the cases where it stands aside. The engine-level check (a 2-rank job with it equals the
1-rank run, and the 2-agent multi-node job, which keeps gloo, equals both) is in
tests/test_torchrun.py."""

from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cnn import dist as D
from cnn.train import exit_without_teardown

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not Path("/dev/shm").is_dir(),
    reason="the shared-memory all-reduce runs on x86-64 hosts with /dev/shm",
)


def _init(rank: int, world: int, store: str) -> D.DistInfo:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return D.DistInfo(rank, rank, world, world, torch.device("cpu"), rank == 0)


class TwoDtypes(nn.Module):
    """One float32 and one float64 layer: DDP puts them in separate buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum() + self.b(x.double()).sum()


def _averages(rank: int, world: int, store: str, out: str, shm_dir: str) -> None:
    D.SHM_DIR = Path(shm_dir)  # this test's own folder: other jobs' segments are not its business
    info = _init(rank, world, store)
    shm = D.SharedMemoryAllReduce(1000, rank, world, timeout_s=60)
    results = []
    # Several generations of different sizes: both slot sets are reused.
    for i, n in enumerate([1000, 7, 513, 1000, 1, 64, 999]):
        mine = torch.randn(n, generator=torch.Generator().manual_seed(100 * i + rank))
        want = mine.clone()
        dist.all_reduce(want)
        results.append((shm.average_(mine.clone()), want / world))
    small = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    assert D.attach_shm_allreduce(small, info) is None  # installed on a small CPU model
    # A DDP model with a float64 layer: that bucket goes to gloo, the float32 one to the hook.
    torch.manual_seed(0)
    model = TwoDtypes()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = D.SharedMemoryAllReduce(sum(p.numel() for p in model.parameters()), rank, world, 60)
    ddp.register_comm_hook(state, D._shm_hook)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))
    ddp(x).backward()
    assert state.generation == 1  # one bucket through shared memory, the float64 one not
    grads = [p.grad.clone() for p in model.parameters()]
    # The reference: the same model's own gradients on this rank, averaged by gloo.
    ref_model = TwoDtypes()
    ref_model.load_state_dict(model.state_dict())
    ref_model(x).backward()
    ref = []
    for p in ref_model.parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        ref.append(g / world)
    if rank == 0:
        torch.save({"averages": results, "grads": grads, "ref": ref}, out)
    # The DDP wrappers go before the process group, as in the engine (`_run` returns before
    # `cleanup`): a DDP reducer outliving its group can abort the process at exit.
    del small, ddp
    dist.barrier()
    shm.close()
    dist.destroy_process_group()
    # Leave as the engine's workers do: a gloo worker thread still holding a finished work
    # object can abort the interpreter's teardown ("terminate called without an active
    # exception", SIGABRT, about 1 run in 8 here; pytorch/pytorch#190489).
    exit_without_teardown(0)


@pytest.mark.parametrize("world", [2, 3])
def test_averages_equal_gloo(world: int, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    shm_dir = Path(tempfile.mkdtemp(prefix="cnnpipe-test-", dir="/dev/shm"))
    try:
        mp.spawn(_averages, args=(world, str(tmp_path / "store"), str(out), str(shm_dir)),
                 nprocs=world)  # fmt: skip
        left = list(shm_dir.iterdir())
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    assert left == []  # unlinked once all had attached
    saved = torch.load(out)
    for got, want in saved["averages"]:
        if world == 2:  # a + b in either order: the same bits as gloo
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(saved["grads"], saved["ref"], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _absent_peer(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    shm = D.SharedMemoryAllReduce(16, rank, world, timeout_s=1.0)
    if rank == 0:
        try:
            shm.average_(torch.ones(16))
        except RuntimeError as e:
            Path(out).write_text(str(e))
    dist.barrier()  # rank 1 waits here: it never joins the all-reduce
    dist.destroy_process_group()


def _uncreatable(rank: int, world: int, store: str, out: str) -> None:
    info = _init(rank, world, store)
    D.SHM_DIR = Path(out)  # a file, not a folder: it passes statvfs, but nothing can go in it
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    why = D.attach_shm_allreduce(ddp, info)
    ddp(torch.ones(1, 2)).sum().backward()  # trains on with gloo
    if rank == 1:
        Path(out).write_text(str(why))
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def test_segment_that_cannot_be_created_leaves_gloo_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "why.txt"
    out.write_text("")
    mp.spawn(_uncreatable, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    why = out.read_text()
    assert why.startswith(f"cannot create {out}/cnnpipe-ar-"), why
    assert why.endswith(": Not a directory"), why


def test_rank_that_never_arrives_times_out(tmp_path: Path) -> None:
    out = tmp_path / "error.txt"
    mp.spawn(_absent_peer, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    assert out.read_text() == "shared-memory all-reduce: rank(s) [1] did not arrive within 1 s"


@pytest.mark.parametrize(
    ("info", "numel", "reason"),
    [
        (D.DistInfo(0, 0, 4, 2, torch.device("cpu"), True), 10, "multi-node"),
        (D.DistInfo(0, 0, 2, 2, torch.device("cuda", 0), True), 10, "CPU job"),
        (D.DistInfo(0, 0, 2, 2, torch.device("cpu"), True), 64 << 20, "too large"),
    ],
)
def test_stands_aside(info: D.DistInfo, numel: int, reason: str) -> None:
    assert reason in (D.shm_allreduce_problem(info, numel) or "")


def test_takes_a_small_single_host_cpu_job() -> None:
    info = D.DistInfo(0, 0, 2, 2, torch.device("cpu"), True)
    assert D.shm_allreduce_problem(info, 62_006) is None
