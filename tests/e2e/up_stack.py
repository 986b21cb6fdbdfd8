"""`promptpix up` as a user runs it, for the end-to-end tests: a real launcher process in a
temporary folder, with its real redis-server, worker and API, and a look at /proc to see
what it started and whether anything outlived it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.redis_server import free_port
from tests.worker.helpers import FAST_LIVENESS, wait_for


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces or ')'
    return fields[0], int(fields[1])


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, with its command line."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            parents.setdefault(st[1], []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found[pid] = cmd.strip()
        todo += parents.get(pid, [])
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped does not count)."""
    st = _proc_stat(pid)
    return st is not None and st[0] != "Z"


class UpStack:
    """`python -m promptpix_cli up` on a free port, run from `workdir`, logging to a file."""

    def __init__(self, workdir: Path, checkpoint: Path, **env: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "up.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTPIX_")}
        full_env.update({
            "PROMPTPIX_CHECKPOINT": str(checkpoint), "PROMPTPIX_DEVICE": "cpu",
            "PROMPTPIX_WORKER_METRICS_PORT": str(self.metrics_port),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **FAST_LIVENESS, **env,
        })
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "promptpix_cli", "up", "--port", str(self.port),
                 "--ready-timeout", "120"],
                cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # so a failed test can still kill all of it
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the launcher's banner (it prints it once /readyz is 200)."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"promptpix up exited {self.proc.returncode}:\n{self.log()}")
            return "promptpix is ready" in self.log()

        wait_for(ready, timeout, "promptpix up to be ready", every=0.2)
        assert httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C the launcher, as a terminal would; return its exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def redis_url(self) -> str:
        """The private Redis's URL, password included, as the launcher gave it to its
        children (only their environment holds it: never a command line or the log)."""
        for pid, cmd in descendants(self.proc.pid).items():
            if "promptpix_cli" in cmd:
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                for entry in raw:
                    if entry.startswith(b"PROMPTPIX_REDIS_URL="):
                        return entry.partition(b"=")[2].decode()
        raise AssertionError(f"no child of promptpix up has PROMPTPIX_REDIS_URL:\n{self.log()}")

    def kill_all(self) -> None:
        """Last-resort cleanup after a failed test: the launcher's group and its children."""
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait_gone(self, pids: list[int], timeout: float = 10.0) -> list[int]:
        """The pids still alive after `timeout` (an empty list is success)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        return [p for p in pids if alive(p)]
