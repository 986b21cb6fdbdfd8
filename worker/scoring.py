"""Score jobs (`worker.jobs.score`): the exact likelihood of one image under each caption.

One forward pass per caption (all captions and the empty prompt in one batch) gives every
sub-pixel's log-probability; from those come the conditional bits/dim per caption, the
unconditional bits/dim, the posterior over the captions and the surprise heatmap. No
guidance is involved: these are the model's own conditional distributions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from typing import Any

import numpy as np
import redis
import torch
from PIL import Image, ImageDraw
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from . import metrics
from .images import UploadRefused, prepared_upload
from .protocol import JobErrorCode, JobStatus, Keys, PayloadError, ScorePayload, storage_full
from .protocol import parse_score_payload as parse

logger = logging.getLogger(__name__)

SCORE_CHUNK = 8  # captions per forward pass (bounds the logits' memory)
HEATMAP_MIN_PX = 256  # the heatmap is enlarged (nearest) to at least this many pixels
SCALE_BAR_PX = 64  # width of the colour scale beside it
# Colour map anchors (dark blue -> purple -> orange -> pale yellow, like "inferno").
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
                     [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
                    dtype=np.float64)


class ScoreRefused(ValueError):
    """The image or the class labels cannot be scored by this model (`invalid_request`)."""


def log_probs(model: Any, image: torch.Tensor, captions: list[str],
              class_labels: list[int] | None) -> torch.Tensor:
    """Each sub-pixel's natural log-probability under each caption: (len(captions), T).

    `image` is uint8 (C, H, W); T = H*W*C in the model's raster order (row, column,
    channel). Runs `model.forward_logits` over chunks of SCORE_CHUNK captions."""
    out = []
    with torch.inference_mode():
        for a in range(0, len(captions), SCORE_CHUNK):
            chunk = captions[a:a + SCORE_CHUNK]
            labels = None if class_labels is None else class_labels[a:a + SCORE_CHUNK]
            images = image.unsqueeze(0).expand(len(chunk), *image.shape).contiguous()
            logits = model.forward_logits(images, chunk, labels).float()
            targets = images.permute(0, 2, 3, 1).reshape(len(chunk), -1).long()
            lp = torch.log_softmax(logits, dim=-1).gather(
                -1, targets.to(logits.device)[..., None])[..., 0]
            out.append(lp.cpu())
    return torch.cat(out)


def tolerant(lp: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Log-probabilities under the outlier model p' = (1 - ε) p + ε / 256."""
    if tolerance <= 0:
        return lp
    return torch.logaddexp(lp + math.log1p(-tolerance),
                           torch.full_like(lp, math.log(tolerance / 256)))


def summarize(captions: list[str], lp: torch.Tensor, lp_uncond: torch.Tensor,
              tolerance: float) -> dict[str, Any]:
    """The job's result: per-caption bits/dim and posterior, ranking, unconditional bits.

    The posterior over the captions (uniform prior) is softmax(log-likelihood), i.e.
    softmax(-total bits * ln 2), of the tolerant likelihood when a tolerance is in force."""
    T = lp.shape[1]
    exact = -lp.double().sum(1) / (T * math.log(2))
    ranked_lp = tolerant(lp.double(), tolerance)
    probability = torch.softmax(ranked_lp.sum(1), dim=0)
    results = []
    for n, caption in enumerate(captions):
        entry: dict[str, Any] = {"caption": caption, "bits_per_dim": float(exact[n]),
                                 "probability": float(probability[n])}
        if tolerance > 0:
            entry["bits_per_dim_tolerant"] = float(-ranked_lp[n].sum() / (T * math.log(2)))
        results.append(entry)
    # Most probable first; ties keep request order.
    ranking = sorted(range(len(captions)), key=lambda n: (-float(probability[n]), n))
    return {"results": results, "ranking": ranking,
            "unconditional_bits_per_dim": float(-lp_uncond.double().sum() / (T * math.log(2))),
            "tolerance": tolerance}


def _colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the colour map."""
    x = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    t = (x - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[hi] * t).round().astype(np.uint8)


def surprise_png(lp: torch.Tensor, size: int, channels: int, caption: str) -> bytes:
    """The heatmap of each pixel's -log2 p (summed over its channels), enlarged to at
    least HEATMAP_MIN_PX, with a colour scale (bits per pixel) on the right."""
    bits = (-lp.double() / math.log(2)).view(size, size, channels).sum(-1).numpy()
    top = max(float(bits.max()), 1e-9)
    scale = max(1, math.ceil(HEATMAP_MIN_PX / size))
    heat = Image.fromarray(_colour(bits / top), mode="RGB").resize(
        (size * scale, size * scale), Image.Resampling.NEAREST)
    h = heat.height
    canvas = Image.new("RGB", (heat.width + SCALE_BAR_PX + 8, h + 18), (255, 255, 255))
    canvas.paste(heat, (0, 0))
    ramp = _colour(np.linspace(1.0, 0.0, h))[:, None, :].repeat(14, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp), mode="RGB"), (heat.width + 6, 0))
    draw = ImageDraw.Draw(canvas)
    x = heat.width + 24
    draw.text((x, 0), f"{top:.1f}", fill=(0, 0, 0))
    draw.text((x, h // 2 - 5), f"{top / 2:.1f}", fill=(0, 0, 0))
    draw.text((x, h - 11), "0", fill=(0, 0, 0))
    draw.text((2, h + 3), f"bits/pixel, {caption[:40]}", fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _prepare(ctx: Any, p: ScorePayload) -> tuple[torch.Tensor, bool]:
    """The stored upload as the model's input, and whether it had to be resized."""
    info = ctx.model_info
    labels = p.params.class_labels
    if labels is not None:
        bad = [x for x in labels if x >= info["num_classes"]]
        if bad:
            raise ScoreRefused(f"class label {bad[0]} is not a class of model {info['id']} "
                               f"({info['num_classes']} classes)")
    try:
        return prepared_upload(ctx.store, p.job_id, info["image_size"], info["channels"])
    except UploadRefused as e:
        raise ScoreRefused(str(e)) from e


def score(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of a score job; its outcome is recorded in the job hash.

    An image or class label the model cannot take fails the job `invalid_request`; a
    payload that does not parse fails it `invalid_payload`; errors of the model fail it
    `model_error` (timeouts `timeout`). Score jobs never join a sampling batch."""
    from .jobs import _fail, _finish, _model_ref, get_context

    ctx = get_context()
    try:
        p = parse(payload)
    except PayloadError:
        rq_job = get_current_job()
        if rq_job is not None:
            ctx.store.fail_queued(rq_job.id, JobErrorCode.INVALID_PAYLOAD,
                                  "invalid score payload")
        metrics.JOBS_COMPLETED.labels(JobStatus.FAILED.value).inc()
        raise
    ctx.current_jobs = [p.job_id]
    try:
        rq_id = f"{p.job_id}-a{p.attempt}"
        claimed = ctx.store.claim(p.job_id, rq_id, ctx.worker_name, _model_ref(ctx))
        if claimed != "ok":
            logger.info("score job %s attempt %d skipped: %s", p.job_id, p.attempt, claimed)
            return {"job_id": p.job_id, "skipped": claimed}
        try:
            return _run(ctx, p, _finish)
        except ScoreRefused as e:
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.INVALID_REQUEST, str(e))
            raise
        except torch.cuda.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.OUT_OF_MEMORY,
                  f"out of GPU memory: {str(e)[:500]}")
            raise
        except JobTimeoutException:
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.TIMEOUT,
                  f"the job ran longer than PROMPTPIX_JOB_TIMEOUT={ctx.settings.job_timeout} s")
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the reaper hands the job on when Redis is back
        except Exception as e:
            if storage_full(e):
                raise  # the final write was refused for its whole retry window: as above
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.MODEL_ERROR,
                  f"{type(e).__name__}: {str(e)[:1000]}")
            raise
    finally:
        ctx.current_jobs = []


def _run(ctx: Any, p: ScorePayload, finish: Any) -> dict[str, Any]:
    from .jobs import _count_lost

    info, params = ctx.model_info, p.params
    hooks = (p.test_hooks or {}) if ctx.settings.test_hooks else {}
    if hooks.get("score_delay"):  # test hook: a slow score (PROMPTPIX_TEST_HOOKS=1 only)
        time.sleep(float(hooks["score_delay"]))
    start = time.perf_counter()
    x, resized = _prepare(ctx, p)
    captions = [*params.captions, ""]  # the empty prompt: the unconditional likelihood
    labels = None if params.class_labels is None else [*params.class_labels, -1]
    if labels is None and info["num_classes"]:
        labels = [-1] * len(captions)
    lp = log_probs(ctx.model, x, captions, labels)
    result = summarize(params.captions, lp[:-1], lp[-1], params.tolerance)
    result["resized"] = resized
    best = result["ranking"][0]
    heatmap = surprise_png(lp[best], info["image_size"], info["channels"],
                           params.captions[best])
    elapsed = time.perf_counter() - start
    ok = finish(ctx, p.job_id, p.attempt, JobStatus.SUCCEEDED, images=[heatmap],
                result=result)
    if ok:
        metrics.JOBS_COMPLETED.labels(JobStatus.SUCCEEDED.value).inc()
        with contextlib.suppress(redis.RedisError):  # else it expires with the job
            ctx.store.r.delete(Keys.upload(p.job_id))
    else:
        _count_lost(ctx, p.job_id)  # canceled, or handed on, while it was scored
    logger.info("score job %s attempt %d %s in %.2f s (%d captions)", p.job_id, p.attempt,
                "succeeded" if ok else "finished but was no longer ours", elapsed,
                len(params.captions))
    return {"job_id": p.job_id, "scored": len(params.captions)}
