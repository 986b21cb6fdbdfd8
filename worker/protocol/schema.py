"""What the API and the workers agree on: key names, job states, error codes, the payload.

Torch-free: the API process imports this module (through `worker.protocol`).
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ---------------------------------------------------------------------------------------
# Named defaults and limits
QUEUE_NAME = "generate"  # a model's queue is `generate:<model>` (`queue_name`)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # what a model id may be
JOB_FUNC = "worker.jobs.generate"  # dotted path: RQ imports it by name, never unpickles code
KEY_PREFIX = "promptpix"
MAX_SEED = 2**53  # seeds are exact integers in JavaScript below this
# Bounds of every client number, so nothing unbounded reaches torch (settings may lower the
# prompt length and image count further; the worker checks a label against its model).
MAX_TOP_K = 256  # one sub-pixel has 256 values: a larger top_k filters nothing
MAX_IMAGES = 256  # PROMPTPIX_MAX_IMAGES may not exceed it
MAX_PROMPT_CHARS = 10000  # PROMPTPIX_MAX_PROMPT_CHARS may not exceed it
MAX_GUIDANCE_SCALE = 100.0
MAX_CLASS_LABEL = 2**20  # far above any model's classes; the exact check is per model
MAX_BODY_BYTES = 64 * 1024
MAX_CAPTIONS = 32  # captions of one score job (one batch of conditional likelihoods)
MAX_TOLERANCE = 0.5  # outlier share of a sub-pixel's distribution; more would be noise
# The default outlier share: one sub-pixel the model did not expect then costs at most
# log2(256 / 0.01) = 14.6 bits instead of the unbounded -log2 p, while an expected one
# pays at most -log2(0.99) = 0.015 bits more (see docs/likelihood.md).
DEFAULT_TOLERANCE = 0.01
MAX_BEST_OF_FACTOR = 4  # best_of may sample up to 4x num_images
MAX_KEEP_ROWS = 4096  # schema bound of keep_rows; the exact one is the model's rows - 1
PROGRESS_MIN_INTERVAL_S = 0.25  # progress + preview written at most 4x a second
HEARTBEAT_TTL_FACTOR = 3  # a worker key lives 3 heartbeat intervals (5 s -> 15 s)


class JobKind(str, Enum):
    """What a job asks for (API.md "Job kinds"); a sampling batch holds one kind."""

    GENERATE = "generate"
    SCORE = "score"


# The one function a worker may run for each kind (dotted paths, compared as text before
# RQ imports anything): whoever can write to the queue must not choose the code it runs.
JOB_FUNCS: dict[JobKind, str] = {
    JobKind.GENERATE: JOB_FUNC,
    JobKind.SCORE: "worker.jobs.score",
}


class JobStatus(str, Enum):
    """Public job states; `running` may go back to `queued` when its worker is lost."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class Transition(str, Enum):
    """Why a store transition did or did not happen (besides a job's own `JobStatus`, which
    a refused transition returns when the job is already past the state it needs)."""

    OK = "ok"
    MISSING = "missing"  # no such job (never existed, or expired)
    STALE = "stale"  # the job is on another attempt than this queue entry's
    GONE = "gone"  # another worker took the queue entry first


class Admission(str, Enum):
    """What the enqueue transaction did with a submission."""

    CREATED = "created"
    EXISTING = "existing"  # same Idempotency-Key and body: the original job
    CONFLICT = "conflict"  # same Idempotency-Key, another body
    QUEUE_FULL = "queue_full"  # PROMPTPIX_MAX_QUEUE jobs wait
    QUOTA_EXCEEDED = "quota_exceeded"  # PROMPTPIX_MAX_QUEUED_PER_KEY jobs of this caller wait


class WebhookEvent(str, Enum):
    """What a job's webhook may be told (`webhook_events_filter`); body `type` is
    `generation.<value>`."""

    START = "start"
    PROGRESS = "progress"  # at most once a second
    COMPLETED = "completed"  # succeeded, failed or canceled


WEBHOOK_PROGRESS_INTERVAL_S = 1.0


class JobErrorCode(str, Enum):
    """Why a job ended `failed` (only `worker_lost` is ever retried, by the reaper)."""

    WORKER_LOST = "worker_lost"
    TIMEOUT = "timeout"
    MODEL_ERROR = "model_error"
    OUT_OF_MEMORY = "out_of_memory"
    INVALID_PAYLOAD = "invalid_payload"  # the stored payload does not parse (bounds included)
    INVALID_REQUEST = "invalid_request"  # it parses, but this model cannot run it


class ProtocolError(Exception):
    """Base of the torch-free serving errors (bad payloads, unknown jobs)."""


class PayloadError(ProtocolError):
    """A job payload read from Redis does not match `JobPayload`."""


class QueueFull(ProtocolError):
    """PROMPTPIX_MAX_QUEUE jobs are waiting (all callers, all models)."""


class QuotaExceeded(ProtocolError):
    """PROMPTPIX_MAX_QUEUED_PER_KEY jobs of this caller are waiting."""


class IdempotencyConflict(ProtocolError):
    """The Idempotency-Key was used before with a different body (holds the old job id)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with another body")
        self.job_id = job_id


# ---------------------------------------------------------------------------------------
# Redis key names (one place, so API replicas and workers can never disagree)
class Keys:
    """Redis key names; every key the service owns starts with `promptpix:`."""

    running = f"{KEY_PREFIX}:running"  # set of job ids in `running`
    # zset job id -> admission time: jobs admitted and not started yet (MAX_QUEUE counts
    # them; a job handed back to the queue is not admitted again, so not counted again)
    queued = f"{KEY_PREFIX}:queued"
    workers = f"{KEY_PREFIX}:workers"  # zset worker name -> last heartbeat (unix s)
    reaper_lock = f"{KEY_PREFIX}:reaper:lock"
    # hash model id -> its facts (JSON), written when a worker first loads it; persistent
    # (no TTL), so jobs for a model without a live worker are accepted (scale to zero)
    models = f"{KEY_PREFIX}:models"
    # stream of webhook events (job, type, at), appended by the transitions' scripts and
    # read by `promptpix webhooks` with a consumer group; zset of deliveries to retry
    webhook_events = f"{KEY_PREFIX}:webhooks"
    webhook_retries = f"{KEY_PREFIX}:webhooks:retry"

    @staticmethod
    def job(job_id: str) -> str:
        return f"{KEY_PREFIX}:job:{job_id}"

    @staticmethod
    def queued_by(who: str) -> str:
        """zset of one key's (or client address's) admitted, not started jobs."""
        return f"{KEY_PREFIX}:queued:{who}"

    @staticmethod
    def owner_jobs(owner: str) -> str:
        """zset job id -> creation time of one owner's jobs ('' = keys off: everyone's),
        written at admission; entries of expired jobs are dropped as they are read."""
        return f"{KEY_PREFIX}:owner:{owner or '-'}:jobs"

    @staticmethod
    def image(job_id: str, n: int) -> str:
        return f"{KEY_PREFIX}:job:{job_id}:img:{n}"

    @staticmethod
    def preview(job_id: str) -> str:
        return f"{KEY_PREFIX}:job:{job_id}:preview"

    @staticmethod
    def upload(job_id: str) -> str:
        """The image a score job or a completion was submitted with (never echoed in its
        view)."""
        return f"{KEY_PREFIX}:job:{job_id}:upload"

    @staticmethod
    def worker(name: str) -> str:
        return f"{KEY_PREFIX}:worker:{name}"


    @staticmethod
    def idempotency(scope: str, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{KEY_PREFIX}:idem:{scope}:{digest}"


def queue_name(model: str) -> str:
    """The RQ queue of one model's jobs (Redis key `rq:queue:generate:<model>`)."""
    return f"{QUEUE_NAME}:{model}"


def rq_job_id(job_id: str, attempt: int) -> str:
    """The RQ job id of one attempt: a fresh one per attempt fences stale queue entries."""
    return f"{job_id}-a{attempt}"


# ---------------------------------------------------------------------------------------
# Parameters and the job payload
class SamplingParams(BaseModel):
    """The fields a client sets, with their checks; shared by the API's request schema and
    the stored job parameters, so both validate one way."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="text, not only whitespace")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    guidance_scale: float | None = Field(None, ge=1.0, le=MAX_GUIDANCE_SCALE,
                                         description="null = the model's default")
    class_label: int | None = Field(None, ge=0, lt=MAX_CLASS_LABEL)
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN,
                              description="model id (see GET /v1/models); null = the default")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS,
        description="guidance steers away from it (its conditional takes the unconditional "
                    "branch's place); null or empty = plain guidance; no effect at scale 1")
    keep_rows: int | None = Field(
        None, ge=1, le=MAX_KEEP_ROWS,
        description="with init_image: its top rows every image keeps (1..rows-1 of the model)")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain a non-whitespace character")
        return v

    @field_validator("temperature", "top_p", "guidance_scale", mode="before")
    @classmethod
    def _int_is_float(cls, v: Any) -> Any:
        # JSON has one number type: 1 and 1.0 are the same temperature (bools are not).
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v


class GenerationParams(SamplingParams):
    """Sampling parameters of one job, as stored and as sent to the worker (seed resolved)."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(ge=0, lt=MAX_SEED)
    best_of: int | None = Field(None, ge=1, le=MAX_IMAGES,
                                description="sample this many, keep the num_images most "
                                            "probable (null = num_images)")
    has_init_image: bool = Field(False, description="an init image is stored beside the job "
                                                    "(Keys.upload); keep_rows says how much")

    @property
    def samples(self) -> int:
        """Images actually sampled (best_of when set)."""
        return max(self.best_of or 0, self.num_images)

    def image_seeds(self) -> list[int]:
        """Per-image seeds: image k uses seed + k, so it does not depend on num_images."""
        return [self.seed + k for k in range(self.num_images)]

    def sample_seeds(self) -> list[int]:
        """Seeds of every sample (best_of of them when set): sample k uses seed + k."""
        return [self.seed + k for k in range(self.samples)]


class JobPayload(BaseModel):
    """The plain dict an RQ job carries (JSON-serialized; validated again by the worker)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    attempt: int = Field(ge=1, le=1_000_000)
    params: GenerationParams
    # Honoured by the worker only when PROMPTPIX_TEST_HOOKS=1; the API never sets it.
    test_hooks: dict[str, float | bool] | None = None


class ScoreParams(BaseModel):
    """What a score job asks for (the image itself is stored beside the job)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    captions: list[str] = Field(min_length=1, max_length=MAX_CAPTIONS)
    class_labels: list[int] | None = Field(
        None, description="one class per caption (-1 = none), for class-conditional models")
    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0.0, le=MAX_TOLERANCE,
                             description="outlier share mixed into each sub-pixel's "
                                         "distribution; 0 = exact likelihood only")
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN,
                              description="model id (see GET /v1/models); null = the default")

    @field_validator("captions")
    @classmethod
    def _captions(cls, v: list[str]) -> list[str]:
        for n, c in enumerate(v):
            if not 1 <= len(c) <= MAX_PROMPT_CHARS or not c.strip():
                raise ValueError(f"caption {n} must have 1..{MAX_PROMPT_CHARS} characters, "
                                 "not only whitespace")
        return v

    @field_validator("class_labels")
    @classmethod
    def _labels(cls, v: list[int] | None, info: Any) -> list[int] | None:
        if v is None:
            return v
        captions = info.data.get("captions")
        if captions is not None and len(v) != len(captions):
            raise ValueError(f"{len(v)} class_labels for {len(captions)} captions; "
                             "expected one per caption")
        for label in v:
            if not -1 <= label < MAX_CLASS_LABEL:
                raise ValueError(f"class label {label} out of range; expected "
                                 f"-1..{MAX_CLASS_LABEL - 1}")
        return v

    @field_validator("tolerance", mode="before")
    @classmethod
    def _int_is_float(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v


class ScorePayload(BaseModel):
    """The RQ payload of a score job (`worker.jobs.score`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    kind: Literal["score"]
    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    attempt: int = Field(ge=1, le=1_000_000)
    params: ScoreParams
    test_hooks: dict[str, float | bool] | None = None


def payload_kind(data: Any) -> JobKind | None:
    """The kind a raw payload says it is (absent = generate; None = not a known kind)."""
    if not isinstance(data, dict):
        return JobKind.GENERATE  # unparseable: the generate check names the problem
    try:
        return JobKind(data.get("kind", JobKind.GENERATE.value))
    except ValueError:
        return None


def parse_score_payload(data: Any) -> ScorePayload:
    """Validate a score payload; raise `PayloadError` naming the problem."""
    try:
        return ScorePayload.model_validate(data)
    except ValidationError as e:
        raise PayloadError(f"invalid score payload: {e.errors(include_url=False)}") from e


def parse_payload(data: Any) -> JobPayload:
    """Validate a payload dict read from the queue; raise `PayloadError` naming the problem."""
    try:
        return JobPayload.model_validate(data)
    except ValidationError as e:
        raise PayloadError(f"invalid job payload: {e.errors(include_url=False)}") from e


def canonical_json(data: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces), used for hashing request bodies."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
