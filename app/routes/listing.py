"""`GET /v1/generations`: the caller's jobs, newest first, with a status filter and cursor
pagination (read from the per-owner index the admission script writes)."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from worker.protocol import JobKind

from ..deps import PrincipalDep, StoreDep, rate_limited
from ..errors import ERROR_RESPONSES, ApiError
from ..schemas import JobView
from .generations import PREFIX, job_view

MAX_PAGE = 100

router = APIRouter(prefix=PREFIX, tags=["generations"], responses=ERROR_RESPONSES,
                   dependencies=[Depends(rate_limited)])


class JobPage(BaseModel):
    """One page of the caller's jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[JobView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: "
                                                 "no more")


def _encode(cursor: tuple[float, str] | None) -> str | None:
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(f"{cursor[0]!r}:{cursor[1]}".encode()).decode()


def _decode(text: str) -> tuple[float, str]:
    try:
        when, _, job_id = base64.urlsafe_b64decode(text.encode()).decode().partition(":")
        score = float(when)
        if math.isnan(score):  # Redis refuses it as a score bound (a 500 otherwise)
            raise ValueError(when)
        return score, job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise ApiError(422, "invalid_request", "cursor is not one this API returned",
                       "cursor") from e


@router.get("", response_model=JobPage)
def list_jobs(
    principal: PrincipalDep, store: StoreDep,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "canceled"] | None,
                      Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(max_length=200,
                                        description="`next_cursor` of the previous page")] = None,
) -> JobPage:
    """Your generation jobs (this API key's; everyone's when keys are off), newest first;
    score jobs are not listed."""
    jobs, nxt = store.list_jobs(principal.owner, limit,
                                _decode(cursor) if cursor else None, status,
                                kind=JobKind.GENERATE)
    return JobPage(data=[job_view(j, store) for j in jobs], next_cursor=_encode(nxt))
