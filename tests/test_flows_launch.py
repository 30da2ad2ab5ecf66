"""The torchrun launcher and process-tree ownership (tasks/launch.py), the I/O retry condition
and the concurrency slots. Real processes, no Prefect needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from flows_helpers import alive, cmdline

from tasks.common import imports_in_background, is_io_error
from tasks.launch import (
    JobSlots,
    LaunchSpec,
    TrainingJobError,
    build_torchrun_command,
    process_tree,
    run_job,
)


def test_standalone_command_lets_the_os_pick_the_rendezvous_port() -> None:
    cmd = build_torchrun_command("run.yaml", LaunchSpec(nproc_per_node=2, max_restarts=3))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--rdzv-endpoint" not in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--max-restarts") + 1] == "3"
    assert cmd[-4:] == ["-m", "cnn.train", "--config", "run.yaml"]


def test_multinode_command_uses_c10d_rendezvous() -> None:
    spec = LaunchSpec(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400")
    spec.validate()
    cmd = build_torchrun_command("r.yaml", spec)
    assert "--standalone" not in cmd
    for flag, value in (("--nnodes", "2"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "node0:29400"), ("--node-rank", "1")):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (LaunchSpec(nproc_per_node=0), "nproc_per_node=0"),
        (LaunchSpec(nnodes=2), "needs --rdzv-endpoint"),
        (LaunchSpec(nnodes=2, rdzv_endpoint="node0"), "'node0' is not HOST:PORT"),
        (LaunchSpec(nnodes=2, rdzv_endpoint="h:99999"), "not HOST:PORT"),
        (LaunchSpec(nnodes=2, rdzv_endpoint="h:1", node_rank=2), "node_rank=2"),
        (LaunchSpec(max_restarts=-1), "max_restarts=-1"),
    ],
)
def test_bad_launch_values_are_named(spec: LaunchSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spec.validate()


@pytest.mark.parametrize(
    ("spec", "flag"),
    [
        (LaunchSpec(nproc_per_node=0), "pass --nproc-per-node N"),
        (LaunchSpec(nnodes=0), "pass --nnodes N"),
        (LaunchSpec(max_restarts=-1), "pass --max-restarts N"),
    ],
)
def test_bad_launch_values_name_the_flag_that_fixes_them(spec: LaunchSpec, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        spec.validate()


# A stand-in for torchrun: it starts a "worker" in its own session (as torchrun does), and the
# worker starts a grandchild; all of them then sleep.
_TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    worker = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('worker up', flush=True); time.sleep(60)")
    subprocess.Popen([sys.executable, "-c", worker], start_new_session=True)
    print("launcher up", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_an_exception_kills_the_whole_tree_including_new_sessions() -> None:
    seen: list[str] = []
    pids: list[int] = []

    def on_line(line: str) -> None:
        seen.append(line)
        # Launcher and worker print from their own processes, in either order.
        if {"launcher up", "worker up"} <= set(seen) and not pids:
            time.sleep(0.3)  # let the grandchild start
            # Only this job's processes (the test session may have other children).
            pids.extend(p for p in process_tree(os.getpid()) if "sleep(60)" in cmdline(p))
            raise KeyboardInterrupt  # what a cancelled flow raises in this thread

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_job([sys.executable, "-c", _TREE], on_line=on_line, grace=5)
    assert "launcher up" in seen
    assert len(pids) >= 3, pids  # launcher, worker (own session), grandchild
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "orphaned processes left behind"
    assert time.monotonic() - t0 < 15


def test_a_failing_job_reports_its_exit_code_and_last_lines() -> None:
    lines: list[str] = []
    code = "print('loading'); import sys; print('boom: bad thing', file=sys.stderr); sys.exit(3)"
    with pytest.raises(TrainingJobError, match="exit code 3") as info:
        run_job([sys.executable, "-c", code], on_line=lines.append)
    assert info.value.returncode == 3
    assert "boom: bad thing" in str(info.value)
    assert lines == ["loading", "boom: bad thing"]  # stdout and stderr, streamed in order


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_job_gets_sigterm_when_the_launcher_is_killed(tmp_path: Path) -> None:
    """Last line of defence: SIGKILL of the flow process still stops the job (parent-death
    signal), so a crashed flow leaves no torchrun behind."""
    pidfile = tmp_path / "job.pid"
    launcher = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tasks.launch import run_job
        job = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        run_job([sys.executable, "-c", job], on_line=print)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.05)
        job = int(pidfile.read_text())
        assert alive(job)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job)
    finally:
        proc.kill()


def test_io_errors_retry_but_bad_input_does_not() -> None:
    import urllib.error

    assert is_io_error(urllib.error.URLError("connection refused"))
    assert is_io_error(ConnectionResetError())
    assert is_io_error(TimeoutError())
    assert not is_io_error(FileNotFoundError("no such dir"))
    assert not is_io_error(PermissionError())
    assert not is_io_error(ValueError("bad checksum"))
    assert not is_io_error(None)


def test_job_slots_cap_concurrency_and_never_share_a_gpu() -> None:
    slots = JobSlots(2, gpus=["0", "1", "2"])
    in_use: list[str] = []
    peak, clashes = [0], []
    lock = threading.Lock()
    both_held = threading.Event()

    def job() -> None:
        with slots.acquire(1) as gpus:
            with lock:
                clashes.extend(g for g in gpus if g in in_use)
                in_use.extend(gpus)
                peak[0] = max(peak[0], len(in_use))
                if len(in_use) == 2:
                    both_held.set()
            both_held.wait(10)  # hold the slot until two jobs have run at once
            with lock:
                for g in gpus:
                    in_use.remove(g)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and clashes == []
    with pytest.raises(ValueError, match="needs 4 GPUs"), slots.acquire(4):
        pass
    cpu = JobSlots(1)
    with cpu.acquire(2) as gpus:  # a CPU host: only the slot count applies
        assert gpus == []
    with pytest.raises(ValueError, match="max_concurrent=0"):
        JobSlots(0)


def test_imports_in_background_load_during_the_block_and_skip_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline loads what evaluation and registration need while the job runs: in a
    thread, the block not waiting for it, done when the block ends; a module that fails to
    import is left to its user."""
    gate = threading.Event()
    (tmp_path / "gated_mod.py").write_text(
        "import threading\nimport gate_holder\ngate_holder.GATE.wait(60)\n"
        "THREAD = threading.current_thread().name\n"
    )
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    holder = type(sys)("gate_holder")
    holder.GATE = gate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gate_holder", holder)
    for name in ("gated_mod", "broken_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with imports_in_background(["broken_mod", "gated_mod"]):
        # The block runs while the import waits at the gate: it was not waited for.
        assert not hasattr(sys.modules.get("gated_mod"), "THREAD")
        gate.set()
    assert sys.modules["gated_mod"].THREAD == "imports-in-background"  # done at the block's end
    assert "broken_mod" not in sys.modules
