"""The one distributed-utils module: torchrun env -> process group, device, threads, reductions.

Works the same for a plain `python -m cnn.train` (one process, no process group) and for
`torchrun` (gloo on CPU, NCCL on GPU; the device comes from LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Set by the flow of each node of a multi-node job (a fresh token per job and node); global
# rank 0 writes it into result.json, so a node's flow can tell whether rank 0 ran on it even
# when every node sees the same output directory (a shared filesystem).
NODE_TOKEN_ENV = "CNNPIPE_NODE_TOKEN"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def env_world() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun's env (defaults: 1 proc)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, local_rank, world, local_world


def init_distributed(
    device: str = "auto", num_threads: int | None = None, timeout_s: float = 1800.0
) -> DistInfo:
    """Initialise the process group when launched by torchrun and pick this rank's device.

    Threads per rank = cores // local ranks, so 2 ranks on 2 cores do not oversubscribe."""
    rank, local_rank, world, local_world = env_world()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available; use device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    cores = os.cpu_count() or 1
    torch.set_num_threads(num_threads or max(1, cores // max(1, local_world)))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs: dict = {"device_id": dev} if dev.type == "cuda" else {}
        store = _attempt_store(world, local_world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank, local_rank, world, local_world, dev, rank == 0)


def _attempt_store(world: int, local_world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Workaround for pytorch#135712: torchrun's c10d rendezvous shares its TCPStore with the
    workers and never clears it, so after a `--max-restarts` restart the new workers can read
    the previous attempt's process-group keys (stale peer addresses) and fail or hang. On one
    node every worker has the same TORCHELASTIC_RESTART_COUNT, so a per-attempt key prefix
    fixes it. Across nodes the agents' counts can differ; there, launch torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (then each round gets a fresh store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or local_world != world:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"cnn/attempt_{attempt}/", store)


def barrier(info: DistInfo | None = None) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        if info is not None and info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor (unchanged in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (used to agree on a stop flag)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (e.g. a resume path)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------- shared-memory gradient all-reduce (CPU)

# Segments larger than this are not worth it: a model that big is compute-bound, and gloo's
# latency no longer shows. Keeps /dev/shm use small (a 64 MB Docker /dev/shm is common).
SHM_MAX_BYTES = 256 << 20
# A plain file in the shared-memory filesystem, opened and mapped by hand: multiprocessing's
# SharedMemory would register it with a resource tracker that torchrun's workers share.
SHM_DIR = Path("/dev/shm")
_CACHE_LINE = 64


class SharedMemoryAllReduce:
    """Averages DDP's gradient buckets through shared memory when every rank is on this host.

    Hand-written because gloo is latency-bound for small models on CPU: each all-reduce goes
    through TCP on loopback and sleeping threads, ~1.6-2.6 ms even for 16 floats on the 2-core
    development VM (a process wake-up there costs ~150 us), while a LeNet step takes ~9 ms. Here
    each rank copies its bucket into its own slot, publishes a generation counter, spins until
    every rank has published, and sums the slots in rank order (every rank gets the same bits).
    Two slot sets alternate, so a rank can write generation g+1 while a slower one still reads
    g; it cannot reach g+2 before every rank has published g+1, i.e. finished reading g.

    Relies on x86-64's store ordering (data stores become visible before the counter store), so
    `attach_shm_allreduce` only installs it there; other hosts keep gloo. A rank that does not
    arrive within `timeout_s` raises, as a collective would time out.
    """

    def __init__(self, capacity: int, rank: int, world: int, timeout_s: float) -> None:
        self.rank, self.world, self.capacity, self.timeout_s = rank, world, capacity, timeout_s
        words = _CACHE_LINE // 8  # one int64 counter per cache line: no false sharing
        header = world * _CACHE_LINE
        size = self.nbytes(capacity, world)
        path, error = None, None
        if rank == 0:
            path = SHM_DIR / f"cnnpipe-ar-{uuid.uuid4().hex[:16]}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, size)  # zero-filled: every counter starts at generation 0
            except OSError as e:
                error = f"cannot create {path}: {e.strerror}"
        # Every rank learns the path, or rank 0's error (then all raise it alike).
        path, error = broadcast_object((path, error))  # type: ignore[misc]
        if error:
            raise OSError(error)
        try:
            barrier()
            if rank != 0:
                fd = os.open(path, os.O_RDWR)
            barrier()
        finally:
            if rank == 0:  # once all have opened it (or one failed): the mappings stay, and
                path.unlink(missing_ok=True)  # nothing is left behind if a rank dies later
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        buf = memoryview(self._map)
        self._counters = torch.frombuffer(buf, dtype=torch.int64, count=world * words)[::words]
        self._slots = torch.frombuffer(
            buf, dtype=torch.float32, offset=header, count=2 * world * capacity
        ).view(2, world, capacity)
        self._gen = 0

    @property
    def generation(self) -> int:
        """How many all-reduces went through shared memory so far."""
        return self._gen

    @staticmethod
    def nbytes(capacity: int, world: int) -> int:
        return world * _CACHE_LINE + 2 * world * capacity * 4

    def average_(self, flat: torch.Tensor) -> torch.Tensor:
        """In-place mean of a contiguous float32 CPU tensor over all ranks."""
        self._gen += 1
        gen, n = self._gen, flat.numel()
        slots = self._slots[gen % 2]
        slots[self.rank, :n].copy_(flat)
        self._counters[self.rank] = gen  # publish after the data (x86-64 keeps store order)
        deadline = None
        while int(self._counters.min()) < gen:
            os.sched_yield()  # another rank may need this core (more ranks than cores)
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            elif time.monotonic() > deadline:
                late = [r for r in range(self.world) if int(self._counters[r]) < gen]
                raise RuntimeError(
                    f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                    f"{self.timeout_s:.0f} s"
                )
        torch.sum(slots[:, :n], dim=0, out=flat)
        return flat.div_(self.world)

    def close(self) -> None:
        self._counters = self._slots = None  # type: ignore[assignment]
        self._map.close()


def _shm_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: the bucket averaged through shared memory; gloo's all-reduce
    for a bucket it cannot take (every rank decides alike: same dtype, same size). No
    annotations: DDP compares them with dist.GradBucket / Future[Tensor] objects, and this
    module's annotations are strings (`from __future__ import annotations`)."""
    buf = bucket.buffer()
    if buf.dtype != torch.float32 or buf.numel() > state.capacity or not buf.is_contiguous():
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(None, bucket)
    fut = torch.futures.Future()
    fut.set_result(state.average_(buf))
    return fut


def shm_allreduce_problem(info: DistInfo, numel: int) -> str | None:
    """Why the shared-memory all-reduce cannot serve this job (None: it can)."""
    if info.device.type != "cpu":
        return "needs a multi-process CPU job"
    if info.world_size != info.local_world_size:
        return "ranks on other hosts (multi-node)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs x86-64 store ordering, this host is {platform.machine()}"
    size = SharedMemoryAllReduce.nbytes(numel, info.world_size)
    if size > SHM_MAX_BYTES:
        return f"model too large ({size >> 20} MB of shared memory)"
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return f"no {SHM_DIR}"
    if st.f_bavail * st.f_frsize < 2 * size:
        return f"{SHM_DIR} has under {2 * size >> 20} MB free"
    return None


def attach_shm_allreduce(ddp_model: Any, info: DistInfo, timeout_s: float = 1800.0) -> str | None:
    """Install the shared-memory gradient all-reduce on a DDP model when every rank runs on
    this CPU host; returns why not otherwise (then DDP keeps gloo). Every rank must call it:
    rank 0 checks and decides for all (a collective)."""
    numel = sum(p.numel() for p in ddp_model.module.parameters() if p.requires_grad)
    problem = shm_allreduce_problem(info, numel) if info.is_main else None
    problem = broadcast_object(problem)  # rank 0 decides: free space may change meanwhile
    if problem is None:
        try:
            state = SharedMemoryAllReduce(numel, info.rank, info.world_size, timeout_s)
        except OSError as e:  # rank 0 could not create the segment: every rank raised this
            return str(e)
        ddp_model.register_comm_hook(state, _shm_hook)
    return problem


def cleanup() -> None:
    """Destroy the process group so torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
