"""The one `Settings` of the services (environment variables prefixed `PROMPTPIX_`).

It lives in the torch-free protocol package because both rooms read it: the API
(`app.settings` re-exports it) and the workers (which may not import `app`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .schema import (
    HEARTBEAT_TTL_FACTOR,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MODEL_NAME_PATTERN,
)

MIN_API_KEY_CHARS = 16
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def model_name_for(checkpoint: str | Path, name: str | None = None) -> str:
    """A model's id: `name` (PROMPTPIX_MODEL_NAME) or the checkpoint's file stem, with
    characters outside [A-Za-z0-9._-] replaced by '-'."""
    if name:
        return name
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(checkpoint).stem).lstrip("._-")[:64]
    return stem or "model"


def parse_aliases(text: str) -> dict[str, str]:
    """`a=b,c=d` as {a: b, c: d}; a malformed entry raises ValueError naming it."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        foreign, sep, ours = (x.strip() for x in entry.partition("="))
        if not sep or not foreign or not MODEL_NAME.match(ours):
            raise ValueError(f"PROMPTPIX_MODEL_ALIASES entry {entry!r} must be "
                             "foreign-name=model-id")
        out[foreign] = ours
    return out


class Settings(BaseSettings):
    """Service settings; see API.md "Settings". Secrets are `SecretStr` and have no default."""

    model_config = SettingsConfigDict(env_prefix="PROMPTPIX_", extra="ignore")

    # --- server
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint: Path | None = None
    api_keys: SecretStr | None = None  # comma separated; unset = open
    metrics_public: bool = True
    max_queue: int = Field(1000, ge=1)
    # jobs waiting per API key (per client address when keys are off), all models; 0 = off
    max_queued_per_key: int = Field(50, ge=0)
    max_images: int = Field(16, ge=1, le=MAX_IMAGES)
    max_prompt_chars: int = Field(1000, ge=1, le=MAX_PROMPT_CHARS)
    # HTTP body limit of the upload routes (POST /v1/scores); every other route: 64 KiB
    max_upload_bytes: int = Field(4 * 1024 * 1024, ge=MAX_BODY_BYTES)
    result_ttl: int = Field(86400, ge=10)
    job_timeout: int = Field(600, ge=1)
    max_retries: int = Field(2, ge=0)
    shutdown_grace: float = Field(30.0, ge=0)
    rate_limit: int = Field(600, ge=0)  # requests a minute per key / client; 0 = off
    worker_metrics_port: int = Field(9100, ge=0, le=65535)  # 0 = next free from 9100
    device: str | None = None  # default: cuda when available, else cpu
    compile: bool = False
    max_batch: int = Field(1, ge=1)
    # --- liveness (not in API.md's list: tests shorten them)
    heartbeat_interval: float = Field(5.0, gt=0)
    reaper_interval: float = Field(5.0, gt=0)
    # --- test-only hooks in the worker (forced OOM, slow rows); never on in production
    test_hooks: bool = False
    # --- network exposure (API and worker metrics; see docs/reliability.md)
    # Host names a request arriving over loopback may carry (DNS rebinding); unset = the
    # loopback names, checked on loopback connections only; set = checked on every
    # connection; "*" = no check.
    allowed_hosts: str | None = None
    forwarded_allow_ips: str = "127.0.0.1,::1"  # proxies whose X-Forwarded-For is believed
    auth_failure_limit: int = Field(30, ge=0)  # failed auths a minute per address; 0 = off
    worker_metrics_host: str = "127.0.0.1"
    # --- models and the OpenAI-compatible images API (issue 17)
    model_name: str | None = None  # the worker's model id; default: the checkpoint's file stem
    model_aliases: str = ""  # foreign=ours,...  e.g. dall-e-3=shapes16
    models: str = ""  # model ids accepted before any worker registered them: a,b
    default_model: str | None = None  # a request without `model` gets it (else the only one)
    sync_timeout: float = Field(300.0, gt=0, le=3600)  # POST /v1/images/generations waits
    url_secret: SecretStr | None = None  # signs image URLs; unset = random per process
    url_ttl: int = Field(3600, ge=1, le=7 * 86400)  # seconds a signed image URL works
    # --- webhooks (`promptpix webhooks`; issue 17 phase B)
    # Standard Webhooks secret (whsec_<base64>); unset = a request with `webhook` is 422
    webhook_secret: SecretStr | None = None
    # where deliveries may go: "public" (global addresses only) and/or CIDRs, comma separated
    webhook_allow: str = "public"
    webhook_max_attempts: int = Field(10, ge=1, le=50)
    webhook_timeout: float = Field(10.0, gt=0, le=60)  # seconds per delivery attempt
    webhook_backoff_scale: float = Field(1.0, gt=0)  # multiplies the back-off (tests shorten)
    # --- client (`promptpix submit`)
    url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            # Name the scheme only: the URL may carry the Redis password.
            raise ValueError(
                f"PROMPTPIX_REDIS_URL must be redis://, rediss:// or unix://, got {scheme!r}")
        return v

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME.match(v):
            raise ValueError(f"PROMPTPIX_MODEL_NAME must match {MODEL_NAME.pattern}, got {v!r}")
        return v

    @field_validator("default_model")
    @classmethod
    def _default_model(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME.match(v):
            raise ValueError(f"PROMPTPIX_DEFAULT_MODEL must match {MODEL_NAME.pattern}, "
                             f"got {v!r}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: str) -> str:
        for name in (x.strip() for x in v.split(",")):
            if name and not MODEL_NAME.match(name):
                raise ValueError(f"PROMPTPIX_MODELS entry {name!r} must match "
                                 f"{MODEL_NAME.pattern}")
        return v

    @property
    def declared_models(self) -> list[str]:
        """`PROMPTPIX_MODELS` as a list of model ids."""
        return [x.strip() for x in self.models.split(",") if x.strip()]

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, v: str) -> str:
        import ipaddress

        for entry in (e.strip() for e in v.split(",")):
            if entry and entry != "public":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError as e:
                    raise ValueError(f"PROMPTPIX_WEBHOOK_ALLOW entry {entry!r} must be "
                                     "'public' or a CIDR such as 127.0.0.0/8") from e
        return v

    @field_validator("model_aliases")
    @classmethod
    def _aliases(cls, v: str) -> str:
        parse_aliases(v)
        return v

    @property
    def alias_map(self) -> dict[str, str]:
        """`PROMPTPIX_MODEL_ALIASES` as {foreign name: model id}."""
        return parse_aliases(self.model_aliases)

    @field_validator("api_keys")
    @classmethod
    def _keys_valid(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        keys = [k.strip() for k in v.get_secret_value().split(",")]
        if not any(keys):
            return None  # PROMPTPIX_API_KEYS="" means open, like unset
        for i, key in enumerate(keys):
            # Say which entry is wrong without echoing a secret.
            if len(key) < MIN_API_KEY_CHARS or any(c.isspace() for c in key):
                raise ValueError(
                    f"PROMPTPIX_API_KEYS entry {i} has {len(key)} characters: keys must be "
                    f"at least {MIN_API_KEY_CHARS} characters without spaces (make one with "
                    "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`)"
                )
        return v

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication off)."""
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @property
    def heartbeat_ttl_ms(self) -> int:
        """Milliseconds a worker key lives without a refresh (3 heartbeat intervals)."""
        return max(100, int(self.heartbeat_interval * HEARTBEAT_TTL_FACTOR * 1000))

    @property
    def redis_url_safe(self) -> str:
        """The Redis URL with any password masked, for logs (redis-py takes it from the
        user part and from a `password` query parameter)."""
        parts = urlsplit(self.redis_url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if parts.password is None and all(k != "password" for k, _ in query):
            return self.redis_url
        if parts.password is not None:
            host = parts.hostname or ""
            netloc = (f"{parts.username or ''}:***@{host}"
                      + (f":{parts.port}" if parts.port else ""))
            parts = parts._replace(netloc=netloc)
        masked = [(k, "***" if k == "password" else v) for k, v in query]
        return urlunsplit(parts._replace(query=urlencode(masked, safe="*")))


def describe_settings_error(error: ValidationError) -> str:
    """A `Settings` validation error as text without the offending values.

    pydantic's own text repeats each input (`input_value=...`), which would print API keys
    and Redis passwords to logs; this names the variable and the problem only.
    """
    lines = []
    for err in error.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        lines.append(f"  PROMPTPIX_{field.upper()}: {err.get('msg', 'invalid value')}")
    return "\n".join(lines)


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
