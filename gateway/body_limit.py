"""A request-body limit in front of the app: 413 in OpenAI's error shape.

A Content-Length over the limit is refused before anything is read; a body without one (chunked) is
counted as it arrives and refused at the first byte over it, so no body is ever held whole first.
(Starlette's own limit answers in plain text, which no OpenAI client can read.)
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large(limit: int) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": f"request body too large: the limit is {limit} bytes",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "request_too_large"}}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, body


class BodySizeLimit:
    """`per_path`: other limits for some paths (file uploads take `max_file_bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None):
        self.app = app
        self.default_max_bytes = max_bytes
        self.per_path = per_path or {}

    async def _refuse(self, send: Send, limit: int) -> None:
        start, body = _too_large(limit)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope.get("path", ""), self.default_max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, limit)
        seen = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await self._refuse(send, limit)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
