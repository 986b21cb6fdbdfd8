"""The load bench, bounded: a short run must lose nothing; with a low queue limit, 429
`queue_full` appear and nothing else breaks (the full 50-client run: docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.load import main


@pytest.mark.slow
@pytest.mark.parametrize("max_queue", [None, 3])
def test_load_smoke(tmp_path: Path, tiny_checkpoint: Path, max_queue: int | None) -> None:
    out = tmp_path / "load.json"
    args = ["--clients", "10", "--duration", "10", "--drain", "60", "--checkpoint",
            str(tiny_checkpoint), "--json", str(out)]
    if max_queue is not None:
        args += ["--max-queue", str(max_queue)]
    assert main(args) == 0
    f = json.loads(out.read_text())
    assert f["lost"] == f["unfinished"] == f["failed"] == f["client_errors"] == 0, f
    assert f["submitted"] == f["completed"] > 0, f
    assert set(f["http_codes"]) <= {"200", "202", "429"}, f
    assert f["api_unhandled_errors"] == 0 and f["workers_alive_at_end"] == 2, f
    if max_queue is not None:
        assert f["queue_full_429"] > 0, f
