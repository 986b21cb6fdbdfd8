"""`promptpix up`: the whole service on one machine, in one command.

Starts a private `redis-server` (unless PROMPTPIX_REDIS_URL names one), one or more worker
processes holding the checkpoint, and the API; waits until `/readyz` says the service is
ready, prints where to go, and on Ctrl-C / SIGTERM stops everything it started.

Each child runs in its own session (so its process group holds it and anything it forks)
and gets SIGTERM if the launcher dies; stopping signals the whole group, waits, escalates
to SIGKILL, and sweeps the group before reaping its leader, so nothing is left behind.
Only the standard library is used here: the launcher itself never imports the model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app.redis_server import RedisServer

DEMO_CHECKPOINT = Path("checkpoints") / "demo" / "shapes16.pth"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "a large red circle in the center on a white background"
READY_TIMEOUT_S = 300.0
# The private Redis is thrown away on exit, so a job still running then is worth little:
# workers get a short grace (unless the user set one) and the launcher waits this much more.
LOCAL_SHUTDOWN_GRACE_S = 5
STOP_MARGIN_S = 15.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LaunchError(Exception):
    """A reason `promptpix up` cannot start, worded for the person who ran it."""


@dataclass
class Child:
    """One process group the launcher started (the API or a worker)."""

    name: str
    proc: subprocess.Popen[bytes]


def say(msg: str) -> None:
    # The terminal (or a `| tee` that Ctrl-C also ended) may be gone while we stop:
    # losing a message must not stop the cleanup.
    with contextlib.suppress(OSError):
        print(f"promptpix up: {msg}", flush=True)


def resolve_checkpoint(explicit: str | None) -> Path:
    """The checkpoint to serve: --checkpoint, else PROMPTPIX_CHECKPOINT, else the demo model."""
    chosen = explicit or os.environ.get("PROMPTPIX_CHECKPOINT")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise LaunchError(f"checkpoint not found: {path}")
        return path.resolve()
    for candidate in (Path.cwd() / DEMO_CHECKPOINT, REPO_ROOT / DEMO_CHECKPOINT):
        if candidate.is_file():
            return candidate.resolve()
    raise LaunchError(
        f"no checkpoint at {DEMO_CHECKPOINT} (the shipped demo model) nor at "
        f"{REPO_ROOT / DEMO_CHECKPOINT}.\n"
        "Train one (minutes on a CPU) and point at it:\n"
        "  python train_llm_prompt.py --dataset shapes --image_size 16 "
        "--checkpoint_dir checkpoints_llm\n"
        "  PROMPTPIX_CHECKPOINT=checkpoints_llm/best_model.pth promptpix up"
    )


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise LaunchError(
                f"cannot listen on {host}:{port} ({e.strerror}); is another server running? "
                "Choose another port with --port."
            ) from e


def _child_setup(parent_pid: int) -> None:  # runs in the child between fork and exec
    # SIGTERM the child if the launcher dies without cleaning up (even by SIGKILL).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_child(name: str, argv: list[str], env: dict[str, str]) -> Child:
    """Start `python -m promptpix_cli <argv>` in a new session (its own process group)."""
    parent = os.getpid()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptpix_cli", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=lambda: _child_setup(parent),  # safe: the launcher runs no threads
    )
    return Child(name, proc)


def _exited(pid: int) -> bool:
    """True once `pid` has exited; it is left unreaped, so its group id stays reserved."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, sig)


def stop_children(children: list[Child], timeout: float, force: threading.Event) -> None:
    """SIGTERM every group, wait up to `timeout` (or until `force`), then SIGKILL and reap."""
    for child in reversed(children):  # the API first: it stops taking jobs
        if child.proc.returncode is None:
            _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not force.is_set():
        if all(_exited(c.proc.pid) for c in children):
            break
        time.sleep(0.1)
    for child in children:
        if not _exited(child.proc.pid):
            say(f"{child.name} did not stop in time; killing it")
        # Sweep the whole group (stragglers the leader forked) before reaping the leader.
        _signal_group(child, signal.SIGKILL)
        child.proc.wait()


def readiness(base_url: str) -> tuple[bool, str]:
    """(ready, reason) from GET /readyz; the reason is the server's own words when it has some."""
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=2.0) as resp:
            return resp.status == 200, "ready"
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        return False, _reason(body) or f"/readyz answered {e.code}"
    except (OSError, ValueError):
        return False, "the API is not listening yet"


def _reason(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("reason", "detail", "message", "status"):
            if data.get(key):
                return str(data[key])
    return body.strip()[:200]


def example_prompt(base_url: str, api_key: str | None) -> str:
    """The served model's first example prompt (from /v1/models), else a shapes prompt."""
    req = urllib.request.Request(f"{base_url}/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            data = json.load(resp)
        prompts = (data.get("data") or data.get("models"))[0].get("example_prompts") or []
        if prompts and isinstance(prompts[0], str):
            return prompts[0]
    except (OSError, ValueError, LookupError, AttributeError, TypeError):
        pass
    return DEFAULT_PROMPT


def cli_command() -> str:
    """How to run `promptpix` from the launcher's folder: the bare name only when PATH finds
    this installation (an activated venv), else its path (`.venv/bin/promptpix` after `make up`).
    """
    exe = Path(sys.executable).parent / "promptpix"
    if not exe.is_file():
        return f"{shlex.quote(sys.executable)} -m promptpix_cli"
    found = shutil.which("promptpix")
    if found and Path(found).resolve() == exe.resolve():
        return "promptpix"
    try:
        return shlex.quote(str(exe.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(exe))


def banner(base_url: str, prompt: str, keys_on: bool) -> str:
    """The ready message: where the service is, and two commands to paste as printed."""
    body = json.dumps({"prompt": prompt, "num_images": 4, "seed": 1})
    auth = ' -H "Authorization: Bearer $PROMPTPIX_API_KEY"' if keys_on else ""
    key_note = ["    # keys are on: export PROMPTPIX_API_KEY=<your key> first"] if keys_on else []
    return "\n".join([
        "",
        f"  promptpix is ready:  {base_url}/",
        f"  API docs:            {base_url}/docs",
        f"  metrics:             {base_url}/metrics",
        "",
        "  Try it from another terminal, in this folder:",
        *key_note,
        f"    {cli_command()} submit {shlex.quote(prompt)} --num-images 4 --seed 1 --wait \\",
        f"      --out ./out --url {base_url}",
        f"    curl -s -X POST {base_url}/v1/generations{auth} \\",
        f"      -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        "",
        "  Ctrl-C stops everything (twice: at once).",
        "",
    ])


class Launcher:
    """Owns what `promptpix up` started, and the stop request from a signal."""

    def __init__(self) -> None:
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.stop = threading.Event()
        self.force = threading.Event()

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise LaunchError(f"the {child.name} exited with status {code} (see its log above)")

    def wait_ready(self, base_url: str, timeout: float) -> bool:
        """Poll /readyz until 200, showing why not; False if stopped by a signal first."""
        start = time.monotonic()
        last_reason, last_shown = "", 0.0
        while not self.stop.is_set():
            self.check_children()
            ready, reason = readiness(base_url)
            if ready:
                return True
            waited = time.monotonic() - start
            if reason != last_reason or waited - last_shown >= 10.0:
                say(f"waiting for the service ({waited:.0f} s): {reason}")
                last_reason, last_shown = reason, waited
            if waited > timeout:
                raise LaunchError(f"not ready after {timeout:.0f} s: {reason}")
            self.stop.wait(0.5)
        return False

    def shutdown(self, grace: float) -> None:
        # The API and workers first, Redis last: they finish or hand back their jobs through
        # it. (Redis has its own session, so a terminal's Ctrl-C does not reach it first.)
        if self.children:
            say("stopping ...")
            stop_children(self.children, grace + STOP_MARGIN_S, self.force)
            self.children = []
        if self.redis is not None:
            self.redis.cleanup()
            self.redis = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="promptpix up",
        description="Run Redis, worker(s) and the API locally; Ctrl-C stops them all.",
    )
    p.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument(
        "--checkpoint",
        help=f"model to serve (default: $PROMPTPIX_CHECKPOINT, else {DEMO_CHECKPOINT})",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--ready-timeout", type=float, default=READY_TIMEOUT_S,
        help=f"seconds to wait for /readyz (default {READY_TIMEOUT_S:.0f})",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `promptpix up`; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, launcher.on_signal)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PROMPTPIX_SHUTDOWN_GRACE", str(LOCAL_SHUTDOWN_GRACE_S))
    env.setdefault("PROMPTPIX_WORKER_METRICS_PORT", "0")  # 0 = next free port from 9100
    try:
        grace = float(env["PROMPTPIX_SHUTDOWN_GRACE"])
    except ValueError:
        grace = 30.0
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    base_url = f"http://{connect_host}:{args.port}"
    try:
        env["PROMPTPIX_CHECKPOINT"] = str(resolve_checkpoint(args.checkpoint))
        ensure_port_free(args.host, args.port)
        if env.get("PROMPTPIX_REDIS_URL"):
            say(f"using Redis at {env['PROMPTPIX_REDIS_URL'].split('@')[-1]}")
        else:
            # A password, so other local users cannot write jobs into it; it travels in the
            # server's config file and the children's environment, never in argv or logs.
            parent = os.getpid()
            launcher.redis = RedisServer(password=secrets.token_urlsafe(32)).start(
                preexec_fn=lambda: _child_setup(parent))
            env["PROMPTPIX_REDIS_URL"] = launcher.redis.url
            say(f"started a private redis-server on {launcher.redis.safe_url} (password set)")
        if launcher.stop.is_set():  # Ctrl-C while Redis started
            return 0
        say(f"serving {env['PROMPTPIX_CHECKPOINT']}")
        for i in range(args.workers):
            name = "worker" if args.workers == 1 else f"worker {i + 1}"
            launcher.children.append(start_child(name, ["worker"], env))
        serve = ["serve", "--host", args.host, "--port", str(args.port)]
        launcher.children.append(start_child("API", serve, env))
        if not launcher.wait_ready(base_url, args.ready_timeout):
            return 0
        keys = [k.strip() for k in env.get("PROMPTPIX_API_KEYS", "").split(",") if k.strip()]
        key = env.get("PROMPTPIX_API_KEY") or (keys[0] if keys else None)
        say("ready" + banner(base_url, example_prompt(base_url, key), bool(keys)))
        while not launcher.stop.wait(0.5):
            launcher.check_children()
        return 0
    except (LaunchError, FileNotFoundError, RuntimeError) as e:  # RedisServer raises the last two
        say(f"error: {e}")
        return 1
    finally:
        launcher.shutdown(grace)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
