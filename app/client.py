"""`promptpix submit`: send a prompt to a running server, follow it, and save the PNGs.

    promptpix submit "a red circle" --num-images 4 --seed 1 --wait --out ./out \\
        --url http://127.0.0.1:8000
    promptpix submit "a red circle" --init-image top.png --keep-rows 6 --wait  # completion

The server's URL and API key come from --url / --api-key or PROMPTPIX_URL /
PROMPTPIX_API_KEY. Without --wait it prints the new job (JSON) and returns at once. With
--wait it shows a progress bar while it polls, writes `<out>/<job id>-<n>.png`, and exits
0; a refused request, a failed or canceled job, or an unreachable server exits 1 with the
server's own message. Ctrl-C while waiting cancels the job.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "canceled")
POLL_INTERVAL_S = 0.25
JOB_ID = re.compile(r"[0-9a-f]{32}")  # what the server's ids look like (uuid4 hex)


class ClientError(Exception):
    """Something to tell the user and exit 1 for (a refusal, a failed job, no server)."""


def error_message(resp: httpx.Response) -> str:
    """The server's error in one line: `code: message (field)` from the API's error body."""
    try:
        err = resp.json().get("error", {})
    except (ValueError, AttributeError):
        err = {}
    if not isinstance(err, dict) or not err.get("message"):
        return f"HTTP {resp.status_code}: {resp.text.strip()[:300] or resp.reason_phrase}"
    text = f"{err.get('code', resp.status_code)}: {err['message']}"
    if err.get("field"):
        text += f" (field: {err['field']})"
    if resp.headers.get("Retry-After"):
        text += f"; retry after {resp.headers['Retry-After']} s"
    return text


def image_b64(path: Path) -> str:
    """An image file as the base64 text the upload fields take (the server checks it)."""
    try:
        return base64.b64encode(path.read_bytes()).decode()
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e}") from e


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/generations body: only what the user set, so the server's defaults hold."""
    body: dict[str, Any] = {"prompt": args.prompt, "num_images": args.num_images}
    for field in ("model", "temperature", "top_k", "top_p", "guidance_scale", "seed",
                  "class_label", "keep_rows", "negative_prompt", "best_of"):
        value = getattr(args, field)
        if value is not None:
            body[field] = value
    if args.init_image is not None:
        body["init_image"] = image_b64(args.init_image)
    return body


def checked_job_id(value: object) -> str:
    """A job id from the server, refused unless it is 32 hex digits (it names files)."""
    if not isinstance(value, str) or not JOB_ID.fullmatch(value):
        raise ClientError(f"the server sent a malformed job id {str(value)[:80]!r} "
                          "(expected 32 hex digits)")
    return value


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


class Session:
    """One server: base URL, auth header, and the calls `submit` makes.

    The API key is sent to the server's own origin only: a URL the server returns that
    points elsewhere is refused, not fetched (redirects are not followed either).
    """

    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                 follow_redirects=False)

    def same_origin(self, url: str) -> str:
        """`url` (relative or absolute) if it is on the server's origin, else ClientError."""
        target = self.http.build_request("GET", url).url  # exactly what would be fetched
        if _origin(target) != _origin(self.http.base_url):
            raise ClientError(f"the server sent a URL on another origin ({url[:200]}); not "
                              "fetched, so the API key stays with the server")
        return url

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.http.base_url}: {e}") from e
        if resp.status_code >= 400:
            raise ClientError(error_message(resp))
        return resp

    def submit(self, body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.call("POST", "/v1/generations", json=body, headers=headers).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/generations/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/generations/{job_id}").json()

    def download(self, url: str) -> bytes:
        return self.call("GET", self.same_origin(url)).content


def _describe(job: dict[str, Any]) -> str:
    if job.get("status") == "queued":
        pos = job.get("queue_position")
        return "queued" if pos is None else f"queued (position {pos})"
    attempt = job.get("attempt") or 1
    return str(job.get("status")) + (f" (attempt {attempt})" if attempt > 1 else "")


def follow(session: Session, job_id: str, deadline: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it ends, with a tqdm bar of its progress; returns the final job."""
    from tqdm import tqdm

    with tqdm(total=100, unit="%", disable=quiet, file=sys.stderr,
              bar_format="{desc} |{bar}| {n:.0f}% [{elapsed}]") as bar:
        while True:
            job = session.status(job_id)
            bar.set_description_str(_describe(job), refresh=False)
            done = 100.0 if job.get("status") == "succeeded" else 100.0 * (job.get("progress") or 0)
            bar.update(done - bar.n)  # may go back to 0 when a lost job is retried
            if job.get("status") in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise ClientError(f"job {job_id} still {job.get('status')} after the --timeout")
            time.sleep(POLL_INTERVAL_S)


def save_images(session: Session, job: dict[str, Any], out: Path) -> list[Path]:
    """Fetch every image of a succeeded job into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    job_id = checked_job_id(job.get("id"))
    for n, url in enumerate(job.get("images") or []):
        path = out / f"{job_id}-{n}.png"
        path.write_bytes(session.download(url))
        paths.append(path)
    return paths


def wait_and_save(session: Session, job_id: str, out: Path, timeout: float,
                  quiet: bool = False) -> list[Path]:
    """Follow the job to its end and save its PNGs; a failed or canceled job raises
    ClientError with the server's reason."""
    job = follow(session, job_id, time.monotonic() + timeout, quiet)
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        detail = f"{err.get('code')}: {err.get('message')}" if err else "no reason given"
        raise ClientError(f"job {job_id} {job['status']}: {detail}")
    return save_images(session, job, out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="promptpix submit",
        description="Submit a prompt to a promptpix server; with --wait, save the PNGs.",
    )
    p.add_argument("prompt", help="the text to draw")
    p.add_argument("--num-images", "-n", type=int, default=1, help="images to make (default 1)")
    p.add_argument("--model", "-m", help="model id (GET /v1/models; default: the server's)")
    p.add_argument("--seed", type=int, help="random seed (default: the server draws one)")
    p.add_argument("--temperature", type=float, help="sampling temperature in (0, 2]")
    p.add_argument("--top-k", type=int, help="keep the k likeliest values (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--guidance-scale", "--guidance", type=float,
                   help="classifier-free guidance (>= 1; default: the model's)")
    p.add_argument("--class-label", type=int, help="class id, for class-conditional models")
    p.add_argument("--negative-prompt", help="guidance steers away from this text")
    p.add_argument("--best-of", type=int,
                   help="sample this many (up to 4x --num-images), keep the most probable")
    p.add_argument("--init-image", type=Path,
                   help="completion: PNG/JPEG/WebP whose top --keep-rows rows are kept")
    p.add_argument("--keep-rows", type=int, help="rows of --init-image to keep (1..rows-1)")
    p.add_argument("--wait", action="store_true", help="follow the job and save its PNGs")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs (default .)")
    p.add_argument("--url", default=os.environ.get("PROMPTPIX_URL", DEFAULT_URL),
                   help=f"server (default $PROMPTPIX_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get("PROMPTPIX_API_KEY"),
                   help="API key (default $PROMPTPIX_API_KEY)")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="give up waiting after this many seconds (default 3600)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `promptpix submit`; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    session = Session(args.url, args.api_key)
    job_id = None
    try:
        job = session.submit(build_request(args), args.idempotency_key)
        job_id = checked_job_id(job.get("id"))
        if not args.wait:
            print(json.dumps(job, indent=2))
            return 0
        if not args.quiet:
            print(f"job {job_id} (seed {job.get('seed')})", file=sys.stderr)
        for path in wait_and_save(session, job_id, args.out, args.timeout, args.quiet):
            print(path)
        return 0
    except KeyboardInterrupt:
        if job_id is not None:
            try:
                session.cancel(job_id)
                print(f"\ncanceled job {job_id}", file=sys.stderr)
            except ClientError as e:
                print(f"\ncould not cancel job {job_id}: {e}", file=sys.stderr)
        return 130
    except ClientError as e:
        print(f"promptpix submit: {e}", file=sys.stderr)
        return 1
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
