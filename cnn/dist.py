"""The one distributed-utils module: torchrun env -> process group, device, threads, reductions.

Works the same for a plain `python -m cnn.train` (one process, no process group) and for
`torchrun` (gloo on CPU, NCCL on GPU; the device comes from LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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


def cleanup() -> None:
    """Destroy the process group so torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
