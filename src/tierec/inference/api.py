"""What the HTTP API answers with: request and response bodies (pydantic), and errors as JSON.

`ApiError` is an answer other than 200 raised anywhere below a route (the model thread
included); `error_response` renders every error alike: ``{"error": MESSAGE, "field": WHERE}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

NOT_FINITE = "the ranker's score is not a finite number for these dense values (too large for the model)"


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[dict[str, Any]] = Field(min_length=1,
                                          description="samples: feature name -> number / ID / list of IDs")


class PredictResponse(BaseModel):
    probabilities: list[float] = Field(description="per sample: the (first) label's probability, e.g. a click")
    logits: list[float]
    step: int = Field(description="training step of the checkpoint that scored the samples")
    tasks: dict[str, list[float]] | None = Field(
        None, description="a multi-task model (mmoe, ple): every label's probability per sample, by label name")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: dict[str, Any] = Field(description="user-side sparse features and dense features: name -> values")
    k: int = Field(10, ge=1, description="items to return")
    candidates: int | None = Field(None, ge=1, description="items retrieved from the index before ranking")


class RecommendedItem(BaseModel):
    item: int = Field(description="index of the item in the corpus")
    score: float = Field(description="ranker probability")
    retrieval_score: float = Field(description="inner product of the user and item vectors")
    features: dict[str, list[int]] = Field(description="the item's item-side feature rows")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    ranker_step: int
    retriever_step: int


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(default=None, description="ranker checkpoint (default: newest of the startup path)")
    retriever: str | None = Field(default=None, description="two-tower checkpoint to reload the retriever from")


class ApiError(Exception):
    """An answer with HTTP ``status`` about the request's ``field`` (None: the request as a whole)."""

    def __init__(self, status: int, field: str | None, message: str):
        self.status, self.field, self.message = status, field, message


class _AsciiJSON(JSONResponse):
    """JSON with \\u escapes: an error naming a field that holds a lone surrogate still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return _AsciiJSON(body, status_code=status, headers=headers)
