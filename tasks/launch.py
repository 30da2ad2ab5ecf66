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
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
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


# Exceptions that a retry cannot fix: the input or the config is wrong (the engine's
# non-finite-loss error is a FloatingPointError). Crashes (a signal, no Python exception) and
# I/O errors are retried.
DETERMINISTIC_ERRORS = frozenset(
    {"ValueError", "FileNotFoundError", "FloatingPointError", "KeyError", "TypeError",
     "IsADirectoryError", "NotADirectoryError", "PermissionError", "ChecksumError",
     "UnsafeArchiveError", "ModuleNotFoundError", "ImportError", "SyntaxError"}
)  # fmt: skip
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
_EXC_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning))(?::\s?(.*))?$"
)
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")


def parse_job_exception(lines: Sequence[str]) -> tuple[str, str, int | None] | None:
    """(exception type, first message line, rank) of the first Python exception a worker
    printed, or None. Worker lines carry torchrun's `[rankN]: ` prefix once the process group
    is up; torchrun's own ChildFailedError traceback and summary are skipped."""
    in_tb: dict[int | None, bool] = {}
    found: tuple[str, str, int | None] | None = None
    root_rank: int | None = None
    in_root = False
    for raw in lines:
        m = _RANK_PREFIX.match(raw)
        rank = int(m.group(1)) if m else None
        line = raw[m.end() :] if m else raw
        if line.startswith("Root Cause"):
            in_root = True
        elif in_root and root_rank is None and (r := _ROOT_RANK.match(line)):
            root_rank = int(r.group(1))
        if line.startswith("Traceback (most recent call last)"):
            in_tb[rank] = True
            continue
        if not in_tb.get(rank) or line.startswith((" ", "\t")):
            continue
        in_tb[rank] = False
        e = _EXC_LINE.match(line.strip())
        if e and not e.group(1).endswith("ChildFailedError") and found is None:
            found = (e.group(1).rsplit(".", 1)[-1], (e.group(2) or "").strip(), rank)
    if found is not None and found[2] is None and root_rank is not None:
        found = (found[0], found[1], root_rank)
    return found


class TrainingJobError(RuntimeError):
    """The training job exited non-zero. The message is ONE line: the job's own exception
    (type, message, rank) when it printed one, else the exit code and its last output line;
    `tail` keeps the last lines for the logs."""

    def __init__(self, returncode: int, tail: Sequence[str]) -> None:
        self.returncode = returncode
        self.tail = list(tail)
        parsed = parse_job_exception(self.tail)
        self.exc_type, self.exc_message, self.rank = parsed if parsed else (None, None, None)
        if parsed:
            on = f" on rank {self.rank}" if self.rank is not None else ""
            msg = f"training job failed{on}: {self.exc_type}: {self.exc_message}"
        else:
            last = next((ln.strip() for ln in reversed(self.tail) if ln.strip()), "")
            msg = f"training job failed with exit code {returncode}; last output: {last}"
        super().__init__(msg)

    @property
    def deterministic(self) -> bool:
        """True when a retry would fail the same way (bad input, non-finite loss)."""
        return self.exc_type in DETERMINISTIC_ERRORS


class JobCancelledError(RuntimeError):
    """A job was not started because this process is stopping (a signal arrived)."""


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
            raise ValueError(
                f"nproc_per_node={self.nproc_per_node} must be >= 1; pass --nproc-per-node N "
                "(processes per node, e.g. the number of GPUs)"
            )
        if self.nnodes < 1:
            raise ValueError(
                f"nnodes={self.nnodes} must be >= 1; pass --nnodes N (machines in the job)"
            )
        if self.max_restarts < 0:
            raise ValueError(
                f"max_restarts={self.max_restarts} must be >= 0; pass --max-restarts N (0 = none)"
            )
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


# Environment for every torchrun job. TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's c10d
# rendezvous otherwise shares one never-cleared TCPStore with the workers, and after a
# --max-restarts restart on several nodes the new workers can read the previous attempt's peer
# addresses and hang (pytorch#135712; cnn/dist.py works around it on one node only).
TORCHRUN_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1"),
}


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
        with suppress(OSError):
            groups.add(os.getpgid(pid))
    own = os.getpgid(0)
    for pgid in groups - {own}:  # never signal our own group (the flow process)
        with suppress(OSError):
            os.killpg(pgid, sig)
    for pid in pids:  # processes that left their group: signal them directly
        with suppress(OSError):
            os.kill(pid, sig)


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


_STOPPING = threading.Event()


def kill_all_jobs(grace: float = 10.0, stop: bool = False) -> int:
    """Stop every job started by `run_job` in this process; returns how many were running.
    With `stop`, no further job starts in this process (a signal: `compare` must not go on to
    the next model)."""
    if stop:
        _STOPPING.set()
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc.pid, grace)
    return len(procs)


def stopping() -> bool:
    """True once a signal asked this process to stop (see `kill_all_jobs(stop=True)`)."""
    return _STOPPING.is_set()


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
    tail_lines: int = 200,
) -> int:
    """Run `cmd` in its own session, pass each output line (stdout+stderr) to `on_line`, and
    return its exit code (0), or raise TrainingJobError. On any exception here (a Prefect
    cancellation, KeyboardInterrupt, a timeout) the whole process tree is stopped first."""
    if _STOPPING.is_set():
        raise JobCancelledError("not started: this process is stopping (interrupted)")
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
        env={**os.environ, **TORCHRUN_ENV, **(env or {})},
        cwd=cwd,
    )
    tail: list[str] = []
    with _registered(proc):
        if _STOPPING.is_set():  # a signal arrived while it started: stop it at once
            kill_tree(proc.pid, grace)
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


# -------------------------------------------------------------------- process identity


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' elsewhere: with the pid
    it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[19].decode()
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """MLflow tags naming the process that owns a run, so a later cnnpipe can tell that the
    owner died without closing it (SIGKILL, OOM) and mark the run KILLED."""
    import socket

    return {
        "cnnpipe.host": socket.gethostname(),
        "cnnpipe.pid": str(os.getpid()),
        "cnnpipe.pid_start": _start_ticks(os.getpid()),
    }


def owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process named by `process_tags()` still runs (True when unknown)."""
    import socket

    if (
        tags.get("cnnpipe.host") != socket.gethostname()
        or not tags.get("cnnpipe.pid", "").isdigit()
    ):
        return True  # another machine's run, or not ours: leave it
    pid = int(tags["cnnpipe.pid"])
    if not _alive(pid):
        return False
    start = tags.get("cnnpipe.pid_start", "")
    return not start or _start_ticks(pid) in ("", start)


# Runs a Python module (`-m NAME ARGS...`) with a watchdog thread: when the launching process
# dies (SIGKILL included), the module's process is stopped (SIGTERM, then exit). Used for the
# embedded Prefect server, which runs in its own session (so Ctrl-C in the terminal does not
# kill it before the flow reports its final state) and must still never outlive cnnpipe.
PARENT_WATCH_EXEC = (
    "import os, runpy, signal, sys, threading, time\n"
    "parent = int(sys.argv[1])\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.2)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    time.sleep(3)\n"
    "    os._exit(143)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "module = sys.argv[3]\n"
    "sys.argv = [module, *sys.argv[4:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def watched_module_command(python: str, module: str, args: Sequence[str]) -> list[str]:
    """`python -m module args...` that stops when this process dies (see PARENT_WATCH_EXEC)."""
    return [python, "-c", PARENT_WATCH_EXEC, str(os.getpid()), "-m", module, *args]


# -------------------------------------------------------------------- concurrency slots


class JobSlots:
    """Caps how many training jobs of one flow run at once and hands each its own GPUs.

    Why not only Prefect's task-runner cap: a job must also know WHICH GPUs are free, so two
    concurrent jobs never share one. `gpus` are device ids (from CUDA_VISIBLE_DEVICES or all
    GPUs); with none, jobs only share the slot count (CPU)."""

    def __init__(self, max_jobs: int, gpus: Sequence[str] = ()) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_concurrent={max_jobs} must be >= 1")
        self.max_jobs = max_jobs
        self._free = list(gpus)
        self._total = len(self._free)
        self._running = 0
        self._cond = threading.Condition()

    @classmethod
    def for_host(cls, max_jobs: int | None, gpus_per_job: int = 1) -> JobSlots:
        """One job per `gpus_per_job` GPUs when there are GPUs (the default cap), else 1."""
        gpus = visible_gpus()
        if max_jobs is None:
            max_jobs = max(1, len(gpus) // max(gpus_per_job, 1)) if gpus else 1
        return cls(max_jobs, gpus)

    @contextmanager
    def acquire(self, n_gpus: int = 0) -> Iterator[list[str]]:
        """Block until a job slot (and `n_gpus` free GPUs, if this host has GPUs) is free."""
        if n_gpus > self._total:
            n_gpus = 0 if self._total == 0 else n_gpus  # CPU host: only the slot count applies
        if n_gpus > self._total:
            raise ValueError(f"a job needs {n_gpus} GPUs but this host has {self._total}")
        with self._cond:
            self._cond.wait_for(lambda: self._running < self.max_jobs and len(self._free) >= n_gpus)
            self._running += 1
            mine, self._free = self._free[:n_gpus], self._free[n_gpus:]
        try:
            yield mine
        finally:
            with self._cond:
                self._running -= 1
                self._free.extend(mine)
                self._cond.notify_all()


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
