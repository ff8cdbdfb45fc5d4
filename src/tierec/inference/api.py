"""What the HTTP API answers with: request and response bodies (pydantic), and errors as JSON.

`ApiError` is an answer other than 200 raised anywhere below a route (the model thread
included); `error_response` renders every error alike: ``{"error": MESSAGE, "field": WHERE}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

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
    exit: list[bool] | None = Field(  # absent unless the server has an exit head (tierec.inference.cascade)
        None, exclude_if=lambda v: v is None, description="--exit-head: per sample, whether the exit head "
        "answered (true) or the full ranker (false); absent without an exit head")
    cached: list[bool] | None = Field(  # absent unless the server has a result cache (tierec.inference.result_cache)
        None, exclude_if=lambda v: v is None, description="--result-cache-size: per sample, whether the answer came "
        "from the result cache; absent without one")


class RecommendRequest(BaseModel):
    """Either ``user`` (a ranker with a two-tower retriever) or ``history`` (a sasrec checkpoint)."""

    model_config = ConfigDict(extra="forbid")
    user: dict[str, Any] | None = Field(None, description="two-tower retrieval: user-side sparse features and "
                                        "dense features: name -> values")
    history: list[StrictInt] | None = Field(
        None, min_length=1, description="sasrec: the user's item IDs, oldest first (the data set's item IDs, "
        "1..num_items); only the last max_len are attended to")
    exclude_history: StrictBool = Field(False, description="sasrec: leave every item of the history out")
    k: int = Field(10, ge=1, description="items to return")
    candidates: int | None = Field(None, ge=1, description="two-tower retrieval: items retrieved from the index "
                                   "before ranking")


class RecommendedItem(BaseModel):
    item: int = Field(description="index of the item in the corpus")
    score: float = Field(description="ranker probability")
    retrieval_score: float = Field(description="inner product of the user and item vectors")
    features: dict[str, list[int]] = Field(description="the item's item-side feature rows")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    ranker_step: int
    retriever_step: int


class NextItem(BaseModel):
    item: int = Field(description="item ID (as in the data set)")
    score: float = Field(description="<h_last, e(item)>: the model's hidden state after the history, times the "
                         "item's embedding")


class HistoryRecommendResponse(BaseModel):
    items: list[NextItem] = Field(description="best first; fewer than k when fewer items are left to recommend")
    step: int = Field(description="training step of the sasrec checkpoint")
    history_used: int = Field(description="items of the history the model attended to (at most max_len: the last)")


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
