"""The container files, checked without a Docker engine.

The compose files are validated against the Compose Specification's JSON schema (vendored
in tests/data/compose-spec.json, from compose-spec/compose-spec, schema/compose-spec.json),
every path they and the Dockerfiles name must exist in the build context, and the images
must install with the Makefile's commands (torch pinned to the same version).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILES = {n: ROOT / "docker" / f"Dockerfile.{n}" for n in ("api", "worker", "trainer")}


class Reset:
    """Compose's `!reset` tag: the merged attribute goes back to `value`."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: safe, plus the `!reset` and `!override` merge tags."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node))
    return Reset(loader.construct_scalar(node) or None)


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _reset)  # same as !reset for a full replacement


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass


def plain(doc: Any) -> Any:
    """`doc` with each Reset replaced by its value (what the schema sees after merging)."""
    if isinstance(doc, Reset):
        return plain(doc.value)
    if isinstance(doc, dict):
        return {k: plain(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [plain(v) for v in doc]
    return doc


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, enough for these files: mappings merge, the
    rest is replaced, and `!reset` replaces whatever was there."""
    if isinstance(override, Reset):
        return plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else plain(value)
        return out
    return plain(override)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def pip_installs(instructions: list[tuple[str, str]]) -> list[str]:
    """Each `pip install ...` command of the RUN lines, in order."""
    cmds = []
    for instr, rest in instructions:
        if instr == "RUN":
            cmds += [c.strip() for c in rest.split("&&") if "pip install" in c]
    return cmds


def makefile_torch_pin() -> str:
    m = re.search(r"pip install\b.*\btorch==([\w.+]+)", (ROOT / "Makefile").read_text())
    assert m, "the Makefile installs no pinned torch"
    return m.group(1)


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` (a path in the build context) out of the context."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = rel.split("/")
        # A pattern matches the path or any folder above it.
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    doc = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(doc)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(schema: dict[str, Any], path: Path) -> None:
    jsonschema.Draft7Validator(schema).validate(plain(load_compose(path)))


def test_merged_cpu_override_matches_the_spec_and_drops_the_gpu(
        schema: dict[str, Any], compose: dict[str, Any]) -> None:
    merged = merge(compose, load_compose(COMPOSE_CPU))
    jsonschema.Draft7Validator(schema).validate(merged)
    for name in ("worker", "trainer"):
        gpu = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in gpu), f"{name} reserves no GPU"
        assert merged["services"][name]["deploy"]["resources"]["reservations"]["devices"] == []
        assert merged["services"][name]["build"]["args"]["TORCH_INDEX_URL"]
    assert merged["services"]["worker"]["environment"]["PROMPTPIX_DEVICE"] == "cpu"
    # The override keeps everything else of the base file.
    assert merged["services"]["worker"]["volumes"] == compose["services"]["worker"]["volumes"]


def test_every_path_the_compose_file_names_exists(compose: dict[str, Any]) -> None:
    for cfg in (load_compose(COMPOSE), load_compose(COMPOSE_CPU)):
        for name, svc in cfg["services"].items():
            if "build" in svc:
                context = ROOT / svc["build"]["context"]
                assert context.is_dir(), f"{name}: build context {context}"
                assert (context / svc["build"]["dockerfile"]).is_file(), f"{name}: dockerfile"
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} is missing"
            elif not source.startswith("${"):  # ${...} paths are the user's (e.g. ./data)
                assert source in declared, f"{name}: volume {source} is not declared"
        for cfg in svc.get("configs", []):
            assert cfg["source"] in compose.get("configs", {}), f"{name}: config {cfg}"
        for dep in svc.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"


def test_services_are_wired_as_documented(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "api", "worker", "prometheus", "trainer"}
    # Redis: private, password, never evicting.
    conf = compose["configs"]["redis_conf"]["content"]
    assert "maxmemory-policy noeviction" in conf
    assert re.search(r"^requirepass \$\{REDIS_PASSWORD:\?", conf, re.M)
    assert "appendonly" in conf
    assert "ports" not in services["redis"]
    for name in ("api", "worker"):
        url = services[name]["environment"]["PROMPTPIX_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD") and "@redis:6379" in url
    # The trainer writes the volume the workers read, at the same path.
    assert services["trainer"]["profiles"] == ["train"]
    assert "checkpoints:/app/checkpoints_llm" in services["trainer"]["volumes"]
    assert "checkpoints:/app/checkpoints_llm:ro" in services["worker"]["volumes"]
    # The worker's default checkpoint is the demo model its image carries.
    default_ckpt = services["worker"]["environment"]["PROMPTPIX_CHECKPOINT"]
    assert default_ckpt.endswith(":-/app/checkpoints/demo/shapes16.pth}")
    worker_df = DOCKERFILES["worker"].read_text()
    assert "COPY checkpoints/demo ./checkpoints/demo" in worker_df
    assert "WORKDIR /app" in worker_df
    # Prometheus scrapes the API and every worker on the port the workers serve.
    prom = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["promptpix-api"]["static_configs"][0]["targets"] == ["api:8000"]
    sd = jobs["promptpix-worker"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == 9100
    assert services["worker"]["environment"]["PROMPTPIX_WORKER_METRICS_PORT"] == "9100"
    assert "9100" in services["worker"]["expose"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_the_context_has(name: str) -> None:
    for instr, rest in dockerfile_instructions(DOCKERFILES[name]):
        if instr != "COPY" or "--from" in rest:
            continue
        *sources, _dest = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile.{name}: COPY {src}: no such path"
            assert not dockerignored(src), f"Dockerfile.{name}: {src} is in .dockerignore"


def test_demo_checkpoint_is_shipped_for_the_worker_image() -> None:
    assert (ROOT / "checkpoints" / "demo" / "shapes16.pth").is_file()
    assert not dockerignored("checkpoints/demo/shapes16.pth")
    assert dockerignored("checkpoints_llm/best_model.pth") and dockerignored(".venv/bin")


def test_images_install_with_the_makefile_commands() -> None:
    pin = makefile_torch_pin()
    # pyproject pins the same torch wherever it names torch (the worker and train extras).
    specs = re.findall(r'"(torch\b[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert len(specs) >= 2 and set(specs) == {f"torch=={pin}"}, specs
    for name, extra in (("worker", "worker,text"), ("trainer", "train,text")):
        cmds = pip_installs(dockerfile_instructions(DOCKERFILES[name]))
        torch_at = [i for i, c in enumerate(cmds) if re.search(rf"\btorch=={re.escape(pin)}$", c)]
        pkg_at = [i for i, c in enumerate(cmds) if c.endswith(f"'.[{extra}]'")]
        assert torch_at and pkg_at and torch_at[0] < pkg_at[0], (
            f"Dockerfile.{name} must pip install torch=={pin}, then '.[{extra}]': {cmds}")
    api = pip_installs(dockerfile_instructions(DOCKERFILES["api"]))
    assert any(c.endswith("'.[api]'") for c in api)
    assert not any("torch" in c for c in api), "the API image must not install torch"
    # The README's manual install is the Makefile's.
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch=={pin}" in readme
    assert "pip install -e '.[dev]'" in readme and "pip install -q -e '.[dev]'" in (
        ROOT / "Makefile").read_text()


def test_images_run_unprivileged_with_readiness_checks() -> None:
    from promptpix_cli import COMMANDS

    for name, path in DOCKERFILES.items():
        instructions = dockerfile_instructions(path)
        users = [rest for instr, rest in instructions if instr == "USER"]
        assert users and users[-1] not in ("root", "0"), f"Dockerfile.{name} runs as root"
        health = [rest for instr, rest in instructions if instr == "HEALTHCHECK"]
        assert len(health) == 1, f"Dockerfile.{name}: one HEALTHCHECK"
        if name == "trainer":
            assert health[0] == "NONE"
            continue
        assert f'promptpix-healthcheck", "{name}"]' in health[0]
        start = re.search(r"--start-period=(\d+)s", health[0])
        assert start and int(start.group(1)) >= 120, "start period must cover the model load"
        cmd = json.loads(next(rest for instr, rest in instructions if instr == "CMD"))
        assert cmd[0] == "promptpix" and cmd[1] in COMMANDS
    api_cmd = json.loads(next(r for i, r in dockerfile_instructions(DOCKERFILES["api"])
                              if i == "CMD"))
    from app.serve import build_parser

    args = build_parser().parse_args(api_cmd[2:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
