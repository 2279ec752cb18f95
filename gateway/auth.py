"""API keys and ownership.

With keys configured (`GatewaySettings.api_keys` / `api_key_file`), every request but /health and /metrics
needs `Authorization: Bearer KEY` (else 401 in OpenAI's error shape); without any, the API stays open and
every caller is the anonymous owner "". A caller is known by the *owner* of its key: a SHA-256 hash, the
only form of a key ever stored. Jobs, files, batches and request ids carry their owner; another owner gets
404 for them, and the block map hides request ids it does not own.

The middleware also applies the per-key request-rate limit (gateway/rate_limit.py) and sets `CALLER`, the
owner of the request being served, which the token-rate limit and request-ownership records read.
"""

from __future__ import annotations

import hashlib
import json
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import rate_limit

# The owner of the HTTP request being served; None outside one (a batch line sets its batch's owner).
CALLER: ContextVar[str | None] = ContextVar("pagedfleet_caller", default=None)
OPEN_PATHS = frozenset({"/health", "/metrics"})
HIDDEN = "(hidden)"


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def request_owner_key(request_id: str) -> str:
    return f"pf:owner:{request_id}"


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, body


def bearer_key(scope: Scope) -> str | None:
    auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, key = auth.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


class ApiKeyAuth:
    """ASGI middleware: authenticates, rate-limits requests, and sets `CALLER` for the route."""

    def __init__(self, app: ASGIApp, keys: list[str], settings):
        self.app = app
        self.owners = frozenset(owner_of(k) for k in keys)
        self.settings = settings

    async def _refuse(self, send: Send, status: int, message: str, code: str, headers=None) -> None:
        start, body = _error(status, message, code, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        owner = ""
        if self.owners:
            key = bearer_key(scope)
            if key is None:
                return await self._refuse(send, 401, "You didn't provide an API key: pass it as "
                                          "'Authorization: Bearer KEY'", "invalid_api_key",
                                          {"WWW-Authenticate": "Bearer"})
            owner = owner_of(key)
            if owner not in self.owners:
                return await self._refuse(send, 401, "Incorrect API key provided", "invalid_api_key",
                                          {"WWW-Authenticate": "Bearer"})
        rpm = self.settings.rate_limit_rpm
        fleet = getattr(scope["app"].state, "fleet", None) if "app" in scope else None
        if rpm and fleet is not None:
            wait = await rate_limit.take(fleet.redis, "requests", owner, rpm)
            if wait > 0:
                e = rate_limit.too_many("requests", rpm, wait)
                return await self._refuse(send, 429, e.message, e.code, e.headers)
        token = CALLER.set(owner)
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER.reset(token)


def get_owner(request: Request) -> str:
    owner = CALLER.get()
    return owner if owner is not None else ""


Owner = Annotated[str, Depends(get_owner)]


def queue_request_owners(pipe, ttl_s: int, owner: str | None, request_ids: list[str]) -> None:
    """Queue on a pipeline the records of who owns these request ids (for the block map); the anonymous
    owner (no keys) owns all, so it records none."""
    if owner:
        for rid in request_ids:
            pipe.set(request_owner_key(rid), owner, ex=ttl_s)


async def record_request_owners(redis, ttl_s: int, owner: str | None, request_ids: list[str]) -> None:
    if not owner:
        return
    async with redis.pipeline(transaction=False) as p:
        queue_request_owners(p, ttl_s, owner, request_ids)
        await p.execute()


def _walk_request_ids(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "request_ids" and isinstance(v, list):
                found.update(x for x in v if isinstance(x, str))
            elif k == "request_id" and isinstance(v, str):
                found.add(v)
            else:
                _walk_request_ids(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk_request_ids(v, found)


def _replace_request_ids(node: Any, hide: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "request_ids" and isinstance(v, list):
                out[k] = [HIDDEN if x in hide else x for x in v]
            elif k == "request_id" and isinstance(v, str):
                out[k] = HIDDEN if v in hide else v
            else:
                out[k] = _replace_request_ids(v, hide)
        return out
    if isinstance(node, list):
        return [_replace_request_ids(v, hide) for v in node]
    return node


async def redact_request_ids(request: Request, data: Any) -> Any:
    """`data` with every request id the caller does not own replaced by "(hidden)" (keys on only)."""
    if not getattr(request.app.state, "auth_enabled", False):
        return data
    owner = get_owner(request)
    found: set[str] = set()
    _walk_request_ids(data, found)
    if not found:
        return data
    ids = sorted(found)
    owners = await request.app.state.fleet.redis.mget([request_owner_key(r) for r in ids])
    hide = {rid for rid, o in zip(ids, owners) if o != owner}
    return _replace_request_ids(data, hide)
