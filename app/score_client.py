"""`promptpix score`: score an image file against captions on a running server.

    promptpix score drawing.png --caption "a red circle" --caption "a blue circle" \\
        [--tolerance 0.01] [--surprise heat.png] [--json] [--url ...] [--api-key ...]

Prints the captions ranked by posterior probability as a small table, with each one's exact
bits/dim (and the tolerant bits/dim when a tolerance is in force) and the unconditional
bits/dim. Exits 1 with the server's message on a refusal or a failed job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .client import (
    DEFAULT_URL,
    POLL_INTERVAL_S,
    TERMINAL,
    ClientError,
    Session,
    checked_job_id,
    image_b64,
)

WAIT_S = 60  # Prefer: wait=60: a quick score comes back in the submission's answer


def ranking_table(job: dict[str, Any]) -> str:
    """The succeeded score job's ranking as text: rank, probability, bits/dim, caption."""
    results = job["results"]
    tolerant = any(r.get("bits_per_dim_tolerant") is not None for r in results)
    head = f"{'rank':>4}  {'probability':>11}  {'bits/dim':>8}"
    head += f"  {'tolerant':>8}" if tolerant else ""
    lines = [head + "  caption"]
    for rank, n in enumerate(job["ranking"], start=1):
        r = results[n]
        line = f"{rank:>4}  {r['probability']:>11.4f}  {r['bits_per_dim']:>8.4f}"
        if tolerant:
            line += f"  {r['bits_per_dim_tolerant']:>8.4f}"
        lines.append(f"{line}  {r['caption']}")
    lines.append(f"unconditional (empty prompt): {job['unconditional_bits_per_dim']:.4f} "
                 f"bits/dim; image {'resized and cropped' if job.get('resized') else 'as is'}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="promptpix score",
                                description="Score an image against captions (exact "
                                            "likelihood) on a promptpix server.")
    p.add_argument("image", type=Path, help="PNG, JPEG or WebP file")
    p.add_argument("--caption", "-c", action="append", required=True,
                   help="a caption to score (repeat, 1..32)")
    p.add_argument("--tolerance", type=float,
                   help="outlier share in [0, 0.5] (default: the server's, 0.01; 0 = exact)")
    p.add_argument("--class-label", type=int, action="append",
                   help="one per caption, for class-conditional models")
    p.add_argument("--model", help="served model id")
    p.add_argument("--surprise", type=Path, help="save the surprise heatmap PNG here")
    p.add_argument("--json", action="store_true", help="print the job view as JSON")
    p.add_argument("--url", default=os.environ.get("PROMPTPIX_URL", DEFAULT_URL),
                   help=f"server (default $PROMPTPIX_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get("PROMPTPIX_API_KEY"),
                   help="API key (default $PROMPTPIX_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up waiting after this many seconds (default 600)")
    return p.parse_args(argv)


def run(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    """Submit the score job and follow it to its end; returns the finished view."""
    body: dict[str, Any] = {"image": image_b64(args.image), "captions": args.caption}
    for field in ("tolerance", "model"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.class_label is not None:
        body["class_labels"] = args.class_label
    job = session.call("POST", "/v1/scores", json=body,
                       headers={"Prefer": f"wait={WAIT_S}"}).json()
    job_id = checked_job_id(job.get("id"))
    deadline = time.monotonic() + args.timeout
    while job.get("status") not in TERMINAL:
        if time.monotonic() > deadline:
            raise ClientError(f"score job {job_id} still {job.get('status')} after --timeout")
        time.sleep(POLL_INTERVAL_S)
        job = session.call("GET", f"/v1/scores/{job_id}").json()
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        raise ClientError(f"score job {job_id} {job['status']}: "
                          f"{err.get('code')}: {err.get('message')}")
    return job


def main(argv: list[str] | None = None) -> int:
    """Entry point of `promptpix score`; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    session = Session(args.url, args.api_key)
    try:
        job = run(session, args)
        if args.surprise is not None and job.get("surprise_url"):
            args.surprise.write_bytes(session.download(job["surprise_url"]))
        print(json.dumps(job, indent=2) if args.json else ranking_table(job))
        return 0
    except ClientError as e:
        print(f"promptpix score: {e}", file=sys.stderr)
        return 1
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
