"""`/v1/models`: every registered (or declared) model, with its live worker count."""

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
    """Every model a worker registered or PROMPTPIX_MODELS declares, in OpenAI's list
    shape: `id` (the name), `checksum`, size, parameters, training facts, examples, live
    `workers` (0: jobs are accepted and wait for one). A declared model no worker has
    loaded yet has no facts (null size)."""
    per_model = Counter(w.get("model_id") for w in store.live_workers())
    models = []
    for m in store.models():
        fields = {k: v for k, v in m.items()
                  if k in ModelInfo.model_fields and k not in ("object", "owned_by")}
        fields["created"] = int(fields.get("created") or 0)
        fields["checksum"] = str(fields.get("checksum") or "")
        models.append(ModelInfo(**{**fields, "workers": per_model.get(m["id"], 0)}))
    return ModelList(data=models)
