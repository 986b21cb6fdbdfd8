"""Which model a request means, and the checks the API can make against its facts."""

from __future__ import annotations

from typing import Any

from worker.protocol import ModelNotFound, ModelRequired, NoModelRegistered, ProtocolError

from .errors import REDIS_RETRY_AFTER_S, ApiError
from .store_async import AsyncStore


async def resolve_model_async(astore: AsyncStore, requested: str | None,
                              status_required: int = 422,
                              status_unknown: int = 404) -> dict[str, Any]:
    """The facts of the model a request names (`AsyncStore.resolve_model`): 422
    `model_required` when it names none and there is no default nor a single model; 404
    `model_not_found` for an unknown name; 503 `unavailable` (Retry-After) while no model is
    registered at all. Facts are `{"id": name}` alone for a model declared but never
    loaded."""
    try:
        return await astore.resolve_model(requested)
    except ProtocolError as e:
        raise _refusal(e, status_required, status_unknown) from e


def _refusal(e: ProtocolError, status_required: int, status_unknown: int) -> Exception:
    if isinstance(e, NoModelRegistered):
        return ApiError(503, "unavailable", str(e),
                        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})
    if isinstance(e, ModelRequired):
        return ApiError(status_required, "model_required", str(e), "model")
    if isinstance(e, ModelNotFound):
        return ApiError(status_unknown, "model_not_found", str(e), "model")
    return e


def check_class_label(model: dict[str, Any], class_label: int | None) -> None:
    """422 `invalid_request` when the model is known not to have that class."""
    if class_label is None or "num_classes" not in model:
        return
    classes = int(model.get("num_classes") or 0)
    if class_label >= classes:
        raise ApiError(422, "invalid_request",
                       f"class_label {class_label} is not a class of model {model['id']!r} "
                       f"({classes} classes)", "class_label")
