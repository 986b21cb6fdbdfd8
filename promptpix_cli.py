"""The `promptpix` console command: subcommands dispatch lazily, so `serve` never imports torch."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Each function takes argv (list[str]).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("app.launcher", "main", "start redis, a worker and the API locally (Ctrl-C stops all)"),
    "serve": ("app.serve", "main", "run the HTTP API (uvicorn)"),
    "worker": ("worker.runtime", "main", "run a GPU/CPU worker serving its model's queue"),
    "train": ("training.cli", "train_main", "train a text-conditioned model"),
    "generate": ("training.cli", "generate_main", "sample PNGs from a checkpoint locally"),
    "eval": ("training.evaluate", "main", "bits/dim and prompt alignment of a checkpoint"),
    "submit": ("app.client", "main", "submit a prompt to a running server and fetch PNGs"),
    "webhooks": ("app.webhook_sender", "main", "deliver job events to their webhooks (signed)"),
    "score": ("app.score_client", "main", "rank captions of an image by exact likelihood"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: promptpix <command> [options]\n\ncommands:")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:<9} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\npromptpix: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, func, _ = COMMANDS[argv[0]]
    rc = getattr(importlib.import_module(module), func)(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
