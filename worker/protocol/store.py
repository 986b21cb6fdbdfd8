"""Job state in Redis: one hash per job (`JobRecord`), written only through atomic steps.

The API (any replica) and the workers share `JobStore`, assembled from one module per
concern: `enqueue` (admission under the caps), `transitions` (the job's life, fenced per
attempt), `liveness` (heartbeats and the reaper), `registry` (models by name). Reads are in
`base`.
"""

from __future__ import annotations

from .connection import redis_connection, storage_full
from .enqueue import EnqueueOps
from .liveness import WORKER_FORGET_S, LivenessOps
from .registry import ModelConflict, ModelNotFound, ModelRequired, NoModelRegistered, RegistryOps
from .schema import IdempotencyConflict, QueueFull, QuotaExceeded
from .transitions import Requeue


class JobStore(EnqueueOps, LivenessOps, RegistryOps):
    """Reads and atomic transitions of jobs, workers and models in one Redis."""


__all__ = ["WORKER_FORGET_S", "IdempotencyConflict", "JobStore", "ModelConflict",
           "ModelNotFound", "ModelRequired", "NoModelRegistered", "QueueFull",
           "QuotaExceeded", "Requeue", "redis_connection", "storage_full"]
