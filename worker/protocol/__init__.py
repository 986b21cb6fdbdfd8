"""The torch-free job protocol shared by the API (`app`) and the workers.

`app` imports only this package from `worker`: settings, Redis key names, job states,
error codes, payload validation, the job store and the reaper.
"""

from .reaper import Periodic, reap_once, start_reaper
from .schema import (
    JOB_FUNC,
    MAX_BODY_BYTES,
    MAX_CLASS_LABEL,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TOP_K,
    PROGRESS_MIN_INTERVAL_S,
    QUEUE_NAME,
    GenerationParams,
    JobErrorCode,
    JobPayload,
    JobStatus,
    Keys,
    PayloadError,
    ProtocolError,
    SamplingParams,
    canonical_json,
    parse_payload,
    rq_job_id,
)
from .settings import Settings, describe_settings_error, get_settings
from .store import IdempotencyConflict, JobStore, redis_connection

__all__ = [
    "JOB_FUNC",
    "MAX_BODY_BYTES",
    "MAX_CLASS_LABEL",
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_TOP_K",
    "PROGRESS_MIN_INTERVAL_S",
    "QUEUE_NAME",
    "GenerationParams",
    "IdempotencyConflict",
    "JobErrorCode",
    "JobPayload",
    "JobStatus",
    "JobStore",
    "Keys",
    "PayloadError",
    "Periodic",
    "ProtocolError",
    "SamplingParams",
    "Settings",
    "canonical_json",
    "describe_settings_error",
    "get_settings",
    "parse_payload",
    "reap_once",
    "redis_connection",
    "rq_job_id",
    "start_reaper",
]
