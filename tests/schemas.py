"""Validation of responses against OpenAI's JSON Schemas (shared/openai-schemas).

``strict`` schemas are verbatim from the official OpenAPI document; every
clawbus object must pass them (and therefore the ``compat`` ones too).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "openai-schemas"


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    schema = orjson.loads((SCHEMA_DIR / f"{name}.json").read_bytes())
    return Draft202012Validator(schema)


def validate(kind: str, obj: Any) -> None:
    """Raise if ``obj`` is not a valid ``kind`` (chat_completion, chat_completion_chunk,
    error_response) under both the strict and the compat schema."""
    for flavour in ("strict", "compat"):
        _validator(f"{kind}.{flavour}").validate(obj)


def validate_strict(kind: str, obj: Any) -> None:
    """Raise if ``obj`` is not a valid ``kind`` under its strict schema, for the
    kinds kept whole with their ``$defs`` and no compat flavour (response,
    response_stream_event, create_response, …)."""
    _validator(f"{kind}.strict").validate(obj)
