"""Request and public response schemas of the HTTP API (see API.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.protocol import MAX_IMAGES, MAX_SEED, SamplingParams


class GenerationRequest(SamplingParams):
    """`POST /v1/generations`: strict types, unknown fields rejected, finite numbers only.

    `prompt` length and `num_images` are further capped by `PROMPTPIX_MAX_PROMPT_CHARS`
    and `PROMPTPIX_MAX_IMAGES` (defaults 1000 and 16).
    """

    model_config = ConfigDict(
        json_schema_extra={"examples": [{
            "prompt": "a large red circle in the top left on a white background",
            "num_images": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "guidance_scale": 3.0, "seed": 1234, "class_label": None,
        }]},
    )

    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="null = drawn and returned")
    best_of: int | None = Field(
        None, ge=1, le=MAX_IMAGES,
        description="sample this many (num_images..4x num_images, counted against "
                    "PROMPTPIX_MAX_IMAGES) and return the num_images most probable")
    webhook: str | None = Field(None, max_length=2048, description=(
        "URL told of this job's events by signed POSTs (Standard Webhooks); needs "
        "PROMPTPIX_WEBHOOK_SECRET on the server, and an address PROMPTPIX_WEBHOOK_ALLOW allows"))
    webhook_events_filter: list[Literal["start", "progress", "completed"]] | None = Field(
        None, min_length=1, description="events to send (default: all three); progress at "
                                        "most once a second")
    init_image: str | None = Field(
        None, min_length=1,
        description="completion: base64 PNG, JPEG or WebP (resized and centre-cropped to the "
                    "model's size as training data is) whose top `keep_rows` rows every "
                    "image keeps; stored beside the job, never echoed")

    def job_fields(self) -> dict[str, object]:
        """The fields stored as the job's parameters (the webhook and the init image are
        kept beside them; `has_init_image` says whether there is one)."""
        return {**self.model_dump(exclude={"webhook", "webhook_events_filter", "init_image"}),
                "has_init_image": self.init_image is not None}


class JobCreated(BaseModel):
    """Answer to a submission (202, or 200 for a repeated Idempotency-Key)."""

    id: str
    status: str
    created_at: str
    status_url: str
    seed: int


class JobModel(BaseModel):
    """The model a job ran on (null until a worker takes it)."""

    id: str
    image_size: int
    channels: int


class JobErrorOut(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class WebhookStatus(BaseModel):
    """How delivering a job's webhook events went."""

    delivered: bool = Field(description="the last event sent was accepted (2xx)")
    attempts: int = Field(description="delivery attempts so far, all events")
    last_status: int | None = Field(description="HTTP status of the last attempt (null: "
                                                "none yet, or no answer)")


class JobView(BaseModel):
    """`GET /v1/generations/{id}`."""

    id: str
    status: str
    attempt: int
    progress: float
    queue_position: int | None
    prompt: str
    params: dict[str, object]
    model: JobModel | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    images: list[str]
    image_bits_per_dim: list[float] | None = Field(
        None, description="each image's exact bits/dim under its prompt (when succeeded; "
                          "a completion's counts the whole image, kept rows included)")
    keep_rows: int | None = Field(None, description="completion: the init image's rows kept")
    has_init_image: bool = Field(False, description="the job was submitted with init_image")
    preview_url: str | None
    error: JobErrorOut | None
    user: str | None = Field(None, description="the `user` label of an OpenAI-API request")
    webhook: WebhookStatus | None = Field(None, description="null: the job has no webhook")


class ModelInfo(BaseModel):
    """A registered model, as an OpenAI model object plus our facts (null size, channels
    and parameters for a model PROMPTPIX_MODELS declares that no worker has loaded yet)."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="the name requests use: PROMPTPIX_MODEL_NAME or the file stem")
    object: Literal["model"] = "model"
    created: int = Field(0, description="unix time the checkpoint records, else 0")
    owned_by: str = "promptpix"
    checksum: str = Field("", description="content hash of the weights (the old `id`)")
    image_size: int | None = None
    channels: int | None = None
    num_classes: int = 0
    parameters: int | None = None
    dataset: str | None = None
    steps: int | None = None
    val_bpd: float | None = None
    default_guidance_scale: float | None = None
    example_prompts: list[str] = []
    workers: int = 0


class ModelList(BaseModel):
    """`GET /v1/models`, in OpenAI's list shape (`client.models.list()` reads it)."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Readiness(BaseModel):
    """`GET /readyz` when ready."""

    status: str
    workers: int
    queue_depth: int
