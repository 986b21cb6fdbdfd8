"""The model registry: every model a worker ever loaded (persistent), plus the ones
PROMPTPIX_MODELS declares; and which model a request means."""

from __future__ import annotations

import json
import logging
from typing import Any

from .base import StoreBase, _s
from .schema import Keys, ProtocolError
from .settings import Settings

logger = logging.getLogger(__name__)


class ModelConflict(ProtocolError):
    """A model id is already registered with other weights (another checksum)."""


class ModelRequired(ProtocolError):
    """A request names no model, and there is no default nor a single registered one."""


class NoModelRegistered(ProtocolError):
    """No model is registered nor declared yet: the service is not ready (no worker has
    started, or a Redis restart without persistence lost the registry until the workers'
    next heartbeat registers them again). Temporary, unlike `ModelRequired`."""


class ModelNotFound(ProtocolError):
    """A request names a model that is neither registered nor declared."""


class RegistryOps(StoreBase):
    """Registering models and resolving the model a request names."""

    def register_model(self, info: dict[str, Any]) -> None:
        """Record a model's facts under its id, for good (no TTL).

        Raises `ModelConflict` when the id is registered with another checksum: two
        different checkpoints must have different names (PROMPTPIX_MODEL_NAME).
        """
        name, checksum = str(info["id"]), str(info.get("checksum") or "")
        if not self.r.hsetnx(Keys.models, name, json.dumps(info)):
            old = json.loads(self.r.hget(Keys.models, name) or "{}")
            if str(old.get("checksum") or "") != checksum:
                raise ModelConflict(
                    f"model {name!r} is registered with checksum {old.get('checksum')!r}, "
                    f"this checkpoint's is {checksum!r}: give it another name "
                    "(PROMPTPIX_MODEL_NAME or a different file name)")
            self.r.hset(Keys.models, name, json.dumps(info))  # same weights: fresh facts
        logger.info("model %s registered (checksum %s)", name, checksum[:12])

    def models(self) -> list[dict[str, Any]]:
        """Facts of every registered model, then `{"id": name}` for each declared one that
        no worker has loaded yet; sorted by id."""
        known = model_facts(self.r.hgetall(Keys.models), self.settings)
        return [known[k] for k in sorted(known)]

    def resolve_model(self, requested: str | None) -> dict[str, Any]:
        """`resolve_in` over the registry as it is now (reads Redis)."""
        return resolve_in(model_facts(self.r.hgetall(Keys.models), self.settings),
                          requested, self.settings)


def model_facts(registry: dict[Any, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    """Facts by model id, from the registry hash (HGETALL's answer) and PROMPTPIX_MODELS."""
    out = {(_s(k) or ""): json.loads(v) for k, v in registry.items()}
    for name in settings.declared_models:
        out.setdefault(name, {"id": name})
    return out


def resolve_in(known: dict[str, dict[str, Any]], requested: str | None,
               settings: Settings) -> dict[str, Any]:
    """The facts of the model a request means among `known` (`{"id": name}` alone when
    declared but never loaded).

    `requested` may be an alias (PROMPTPIX_MODEL_ALIASES); None means
    PROMPTPIX_DEFAULT_MODEL, else the only known model. Raises `ModelRequired` or
    `ModelNotFound` naming the known models, `NoModelRegistered` when none is known.
    """
    if not known:
        raise NoModelRegistered("no model is registered yet (start a worker, or set "
                                "PROMPTPIX_MODELS); retry later")
    if requested is None:
        name = settings.default_model
        if name is None:
            if len(known) != 1:
                raise ModelRequired("name a model: " + ", ".join(sorted(known)))
            name = next(iter(known))
    else:
        name = settings.alias_map.get(requested, requested)
        by_checksum = [m["id"] for m in known.values() if m.get("checksum") == name]
        if name not in known and by_checksum:
            name = by_checksum[0]  # the content hash names its model too
    if name not in known:
        aliases = ", ".join(f"{a}={b}" for a, b in settings.alias_map.items())
        raise ModelNotFound(
            f"model {name!r} is not known here; models: "
            f"{', '.join(sorted(known)) or 'none'}"
            + (f" (aliases: {aliases})" if aliases else ""))
    return known[name]
