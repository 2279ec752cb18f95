"""A batch input file -> its lines: each a request (custom_id, method, url, body) or the error that
line gets in the error file. Blank lines are skipped; a line's index counts the non-blank lines."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

MAX_CUSTOM_ID = 512


@dataclass
class BatchLine:
    index: int
    custom_id: str | None
    body: dict[str, Any] | None = None
    error: str | None = None  # why the line cannot run (it goes to the error file as it is)


def _check(obj: Any, endpoint: str, seen: set[str]) -> tuple[str | None, dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, None, "each line must be a JSON object"
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        return None, None, f"custom_id: must be a non-empty string of at most {MAX_CUSTOM_ID} characters"
    if cid in seen:
        return cid, None, f"custom_id: {cid!r} appears more than once in the file"
    seen.add(cid)
    if obj.get("method") != "POST":
        return cid, None, "method: must be POST"
    if obj.get("url") != endpoint:
        return cid, None, f"url: must be the batch's endpoint {endpoint}, not {obj.get('url')!r}"
    if not isinstance(obj.get("body"), dict):
        return cid, None, "body: must be a JSON object"
    return cid, obj["body"], None


def parse_lines(text: str, endpoint: str) -> list[BatchLine]:
    out: list[BatchLine] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        if not raw.strip():
            continue
        i = len(out)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            out.append(BatchLine(i, None, error=f"line {i + 1}: malformed JSON: {e}"))
            continue
        cid, body, err = _check(obj, endpoint, seen)
        out.append(BatchLine(i, cid, body, f"line {i + 1}: {err}" if err else None))
    return out


def error_line(custom_id: str | None, code: str, message: str) -> dict:
    """An output line for a request that never ran."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def response_line(custom_id: str | None, request_id: str, status_code: int, body: dict) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}
