"""`/v1/models`: the checkpoints that live workers serve (published by them in Redis)."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Depends

from ..deps import StoreDep, rate_limited
from ..errors import ERROR_RESPONSES
from ..schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES,
                   dependencies=[Depends(rate_limited)])


@router.get("", response_model=ModelList)
def list_models(store: StoreDep) -> ModelList:
    """Models with at least one live worker, in OpenAI's list shape: `id` (the name),
    `checksum`, size, parameters, training facts, examples, live `workers`."""
    per_model = Counter(w.get("model_id") for w in store.live_workers())
    models = []
    for m in store.models():
        fields = {k: v for k, v in m.items()
                  if k in ModelInfo.model_fields and k not in ("object", "owned_by")}
        fields["created"] = int(fields.get("created") or 0)
        fields["checksum"] = str(fields.get("checksum") or m["id"])  # a pre-names worker
        models.append(ModelInfo(**{**fields, "workers": per_model.get(m["id"], 0)}))
    return ModelList(data=models)
