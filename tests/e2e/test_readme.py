"""README.md's quick start, run as written, so the README cannot drift from the code.

The blocks run are the fenced ```bash blocks that follow a marker line
`<!-- readme-test: NAME -->` in README.md (the marker survives moving a block around; a
missing marker fails here). They run with bash against a real `promptpix up` started by the
README's own command in a temporary folder, whose `.venv` is a link to the virtual
environment running these tests (so `. .venv/bin/activate` and `.venv/bin/...` work as for
a user, and nothing is installed). The only rewriting is the server's address (a free port
instead of 8000) and, for the pip lines, `--dry-run --no-index`: they must resolve offline
against the installed environment, without a packaging deprecation warning. Scripts run
under `bash -e -o pipefail`, stricter than a paste into a terminal: any failing command fails.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from app.redis_server import free_port
from tests.e2e.up_stack import descendants
from tests.worker.helpers import FAST_LIVENESS, make_tiny_checkpoint, wait_for
from training.config import parse_train_args

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"
# A marker, then (blank lines between allowed) a ```bash fence; both indented alike inside
# a list item, whose indentation is not part of the code a reader copies.
MARKED_BLOCK = re.compile(
    r"^( *)<!-- readme-test: ([\w-]+) -->\n\s*^\1```bash\n(.*?)^\1```", re.M | re.S)
EXPECTED = {"activate", "venv", "curl", "cli", "train-data", "train-cpu"}
VENV_BIN = Path(sys.prefix) / "bin"


def readme_blocks(text: str) -> dict[str, str]:
    """The marked bash blocks of a README: marker name -> the block's text."""
    blocks: dict[str, str] = {}
    for indent, name, body in MARKED_BLOCK.findall(text):
        assert name not in blocks, f"README.md: two blocks marked readme-test: {name}"
        blocks[name] = "".join(line.removeprefix(indent)
                               for line in body.splitlines(keepends=True))
    return blocks


def logical_lines(script: str) -> list[str]:
    """The script's commands, backslash continuations joined, blank lines dropped."""
    return [line for line in script.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    found = readme_blocks(README.read_text())
    missing = EXPECTED - set(found)
    assert not missing, f"README.md lost the blocks marked readme-test: {sorted(missing)}"
    return found


def user_env(**extra: str) -> dict[str, str]:
    """The test's environment without the venv on PATH (as in a fresh terminal) and without
    PROMPTPIX_ settings; PYTHONPATH stays, so a worktree's code is the code run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMPTPIX_") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if p and Path(p).resolve() != VENV_BIN.resolve())
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    """Run `script` with bash -e -o pipefail; fail with its output unless it exits 0."""
    res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"exit {res.returncode}:\n{script}\n--- output:\n{out}"
    return out


def linked_venv(folder: Path) -> Path:
    """`folder`, with `.venv` a link to the environment running the tests."""
    if not (VENV_BIN / "promptpix").is_file() or not (VENV_BIN / "activate").is_file():
        pytest.skip(f"these tests run outside a virtual environment with promptpix installed "
                    f"({VENV_BIN} has no promptpix or activate); run them with .venv/bin/python")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder


def with_url(script: str, url: str) -> str:
    assert README_URL in script, f"the README block no longer uses {README_URL}:\n{script}"
    return script.replace(README_URL, url)


@dataclass
class Service:
    """The README's `promptpix up` line, running in `home`."""

    home: Path
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def service(blocks: dict[str, str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    home = linked_venv(tmp_path_factory.mktemp("readme") / "home")
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    (up_line,) = [line for line in logical_lines(blocks["venv"]) if " up " in line]
    assert up_line.startswith(".venv/bin/promptpix up --port 8000"), up_line
    port = free_port()
    env = user_env(PROMPTPIX_CHECKPOINT=str(checkpoint), PROMPTPIX_DEVICE="cpu",
                   PROMPTPIX_WORKER_METRICS_PORT=str(free_port()), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", **FAST_LIVENESS)
    log_path = home / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["bash", "-c", up_line.replace("--port 8000", f"--port {port}")],
                                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    svc = Service(home, f"http://127.0.0.1:{port}", env, proc, log_path)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"promptpix up exited {proc.returncode}:\n{svc.log()}"
            return "promptpix is ready" in svc.log()

        wait_for(ready, 180, "the README's promptpix up to be ready", every=0.2)
        yield svc
    finally:
        started = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the launcher itself: bash exec'd it
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        for pid in [*started, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


def is_png(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG"
    except OSError:
        return False


def need_curl_and_jq() -> None:
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (`make tools` installs them)")


def test_banner_commands_run_as_printed(service: Service) -> None:
    """`make up`'s "try it" lines, pasted into another terminal in the same folder."""
    need_curl_and_jq()
    banner = service.log().split("promptpix is ready", 1)[1]
    tail = banner.split("Try it", 1)[1].split("\n", 1)[1]
    script = tail.split("\n\n", 1)[0]
    assert "submit" in script and "curl" in script, banner
    out = bash(script, service.home, service.env)
    assert len(list((service.home / "out").glob("*.png"))) == 4, out
    assert re.search(r'"id": ?"[0-9a-f-]{8,}"', out), out  # the curl's 202 body


def test_curl_walk_through(blocks: dict[str, str], service: Service) -> None:
    need_curl_and_jq()
    work = linked_venv(service.home / "curl")
    out = bash(with_url(blocks["curl"], service.url), work, service.env)
    lines = out.strip().splitlines()
    assert re.fullmatch(r"job [0-9a-f-]{8,}", lines[0]), out
    assert '"status": "succeeded"' in out, out
    assert is_png(work / "preview.png") and is_png(work / "image0.png"), out
    assert lines[-1] == "not_cancelable", out  # the finished job's 409, not "null"


def test_cli_example(blocks: dict[str, str], service: Service) -> None:
    work = linked_venv(service.home / "cli")
    out = bash(blocks["activate"] + with_url(blocks["cli"], service.url), work, service.env)
    pngs = sorted((work / "out").glob("*.png"))
    assert len(pngs) == 4 and all(is_png(p) for p in pngs), out


def test_promptpix_needs_the_activation(blocks: dict[str, str], service: Service) -> None:
    """Proof that the environment the blocks get is a fresh terminal's: without the README's
    activation line, `promptpix` is not found."""
    elsewhere = shutil.which("promptpix", path=service.env["PATH"])
    if elsewhere:
        pytest.skip(f"another promptpix is on PATH outside the venv: {elsewhere}")
    res = subprocess.run(["bash", "-c", "promptpix --help"], cwd=service.home,
                         env=service.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 127, res.stdout + res.stderr
    bash(blocks["activate"] + "promptpix --help >/dev/null", service.home, service.env)


def test_venv_install_lines_resolve_offline(blocks: dict[str, str], tmp_path: Path) -> None:
    """The install lines of "the same without make", as dry runs against the installed venv
    in a copy of the project: the pins and extras resolve, and setuptools has no
    deprecation warning about pyproject.toml."""
    lines = logical_lines(blocks["venv"])
    assert lines[0].split("#")[0].split() == ["python3.11", "-m", "venv", ".venv"], lines
    pip_lines = [line for line in lines if line.startswith(".venv/bin/pip install ")]
    assert len(pip_lines) == len(lines) - 2, f"a line this test does not know: {lines}"
    project = linked_venv(tmp_path / "project")
    for name in ("pyproject.toml", "README.md", "promptpix_cli.py"):
        shutil.copy(ROOT / name, project / name)
    for name in ("app", "worker", "model", "training"):
        shutil.copytree(ROOT / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    setuptools = importlib.metadata.version("setuptools")
    for line in pip_lines:
        editable = " -e " in line
        if editable and int(setuptools.split(".")[0]) < 77:
            pytest.skip(f"setuptools {setuptools} in this venv is older than pyproject.toml's "
                        "build requirement (>= 77) and the test cannot fetch one offline")
        dry = line.replace(" install ", " install --dry-run --no-index --no-build-isolation ", 1)
        out = bash(dry, project, user_env())
        assert "deprecat" not in out.lower(), out
        if editable:
            assert "Would install promptpix" in out, out


def test_cpu_training_recipe(blocks: dict[str, str], tmp_path: Path) -> None:
    """The recipe's data snippet makes a `folder` dataset the `folder` loader reads, and
    its training command's flags parse (the run itself is measured by hand: README)."""
    home = linked_venv(tmp_path)
    bash(blocks["activate"] + blocks["train-data"], home, user_env())
    from training.datasets.folder import read_metadata

    root = home / "my_images"
    assert len(read_metadata(root / "metadata.jsonl")) == 60
    assert len(read_metadata(root / "val" / "metadata.jsonl")) == 8
    (command,) = logical_lines(blocks["train-cpu"])
    argv = shlex.split(command, comments=True)
    assert argv[:2] == ["python", "train_llm_prompt.py"], argv
    cfg = parse_train_args(argv[2:])
    assert (cfg.dataset, Path(cfg.data_root)) == ("folder", Path("my_images"))
    assert (cfg.hidden_dim, cfg.num_layers, cfg.text_embed_dim, cfg.num_text_layers,
            cfg.max_text_length, cfg.batch_size) == (128, 4, 128, 2, 32, 16)
