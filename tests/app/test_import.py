"""The API image has no torch: importing the app must not import it."""

from __future__ import annotations

import subprocess
import sys

from tests.worker.helpers import ROOT


def test_import_app_does_not_import_torch() -> None:
    code = (
        "import sys, app, app.main, app.serve, app.routes.generations, worker.protocol\n"
        "app.main.create_app()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')"
        " or m == 'model' or m.startswith('model.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
