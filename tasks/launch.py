"""Launch a training job with torchrun and own its whole process tree (plain functions).

Why hand-written: torchrun starts every worker with `start_new_session=True`, so killing
torchrun's process group does not reach the workers (nor their data-loader children). We
snapshot the whole tree (from /proc on Linux) and signal every process group in it: SIGTERM
first (torchrun forwards it and workers can exit cleanly), SIGKILL after a grace period. As a
last resort, if the launching process itself dies (SIGKILL, OOM), Linux's parent-death signal
makes torchrun receive SIGTERM, and torchrun then stops its workers.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Runs before torchrun: ask Linux to SIGTERM us when the launching thread dies, then exec.
# (preexec_fn would do the same but is unsafe in a threaded process such as a Prefect flow.)
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)  # the launcher died before prctl took effect\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class TrainingJobError(RuntimeError):
    """The training job exited non-zero (its last output lines are in the message)."""

    def __init__(self, returncode: int, tail: Sequence[str]) -> None:
        self.returncode = returncode
        self.tail = list(tail)
        last = "\n".join(self.tail[-15:])
        super().__init__(f"training job failed with exit code {returncode}; last output:\n{last}")


@dataclass(frozen=True)
class LaunchSpec:
    """How torchrun starts the job. Single node (nnodes=1, no endpoint) uses `--standalone`:
    its c10d store binds port 0, so the OS gives every concurrent job its own free port."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous (multi-node)
    rdzv_id: str = "cnnpipe"
    max_restarts: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the bad launch value and the fix."""
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.nnodes < 1:
            raise ValueError(f"nnodes={self.nnodes} must be >= 1")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts} must be >= 0")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes={self.nnodes} needs --rdzv-endpoint HOST:PORT (the c10d rendezvous "
                "host, reachable from every node)"
            )
        if self.rdzv_endpoint:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"rdzv_endpoint={self.rdzv_endpoint!r} is not HOST:PORT; write e.g. "
                    "node0.cluster:29400"
                )
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be in [0, nnodes={self.nnodes})")

    @property
    def standalone(self) -> bool:
        return self.nnodes == 1 and not self.rdzv_endpoint


def build_torchrun_command(
    config_path: str | Path, spec: LaunchSpec, python: str = sys.executable
) -> list[str]:
    """`python -m torch.distributed.run ... -m cnn.train --config run.yaml` (torchrun itself,
    run by this interpreter so the job uses the same environment)."""
    cmd = [python, "-m", "torch.distributed.run"]
    if spec.standalone:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(spec.nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", str(spec.rdzv_endpoint), "--rdzv-id", spec.rdzv_id]
        if spec.node_rank is not None:
            cmd += ["--node-rank", str(spec.node_rank)]
    cmd += ["--nproc-per-node", str(spec.nproc_per_node), "--max-restarts", str(spec.max_restarts)]
    cmd += ["-m", "cnn.train", "--config", str(config_path)]
    return cmd


# -------------------------------------------------------------------- process trees


def _children_map() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (Linux); empty elsewhere."""
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "(comm)": state ppid pgrp ...
        if len(fields) > 2:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all of its descendants (those alive now)."""
    children = _children_map()
    tree, stack = [], [pid]
    while stack:
        p = stack.pop()
        tree.append(p)
        stack.extend(children.get(p, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"  # zombies are dead
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _signal_all(pids: Sequence[int], sig: int) -> None:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    own = os.getpgid(0)
    for pgid in groups - {own}:  # never signal our own group (the flow process)
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:  # processes that left their group: signal them directly
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process tree of `pid` (every process group in it), SIGKILL what is left
    after `grace` seconds. The tree is snapshotted first: workers that outlive torchrun are
    re-parented to init and would otherwise be missed."""
    if os.name != "posix":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], check=False)
        return
    pids = process_tree(pid)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pids = sorted(set(pids) | {q for p in pids if _alive(p) for q in process_tree(p)})
        if not any(_alive(p) for p in pids):
            return
        time.sleep(0.1)
    _signal_all([p for p in pids if _alive(p)], signal.SIGKILL)


# Jobs running in this process, so a signal handler or atexit can stop them all (the flow's
# main thread may be interrupted while jobs run in task-runner threads).
_LIVE: dict[int, subprocess.Popen[str]] = {}
_LIVE_LOCK = threading.Lock()


def kill_all_jobs(grace: float = 10.0) -> int:
    """Stop every job started by `run_job` in this process; returns how many were running."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc.pid, grace)
    return len(procs)


atexit.register(kill_all_jobs, 5.0)


@contextmanager
def _registered(proc: subprocess.Popen[str]) -> Iterator[None]:
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    try:
        yield
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)


def run_job(
    cmd: Sequence[str],
    *,
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    grace: float = 10.0,
    tail_lines: int = 40,
) -> int:
    """Run `cmd` in its own session, pass each output line (stdout+stderr) to `on_line`, and
    return its exit code (0), or raise TrainingJobError. On any exception here (a Prefect
    cancellation, KeyboardInterrupt, a timeout) the whole process tree is stopped first."""
    full = [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), *cmd]
    if not sys.platform.startswith("linux"):
        full = list(cmd)
    proc = subprocess.Popen(
        full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
    )
    tail: list[str] = []
    with _registered(proc):
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail = [*tail[-(tail_lines - 1) :], line]
                on_line(line)
            returncode = proc.wait()
        except BaseException:
            kill_tree(proc.pid, grace)
            proc.wait()
            raise
        finally:
            if proc.poll() is None:  # stdout closed early but the job is still running
                kill_tree(proc.pid, grace)
                proc.wait()
    if returncode != 0:
        raise TrainingJobError(returncode, tail)
    return returncode
