"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) and the app's handlers.

Every failure a client can cause is a 4xx that names the field; a 405 keeps its `Allow` header.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("pagedfleet.gateway")

# The two members of the job body (api_models.JobRequest): pydantic puts the tag first in an error's loc.
_JOB_TAGS = ("completion", "chat")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status_code: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code


def error_response(status: int, message: str, param: str | None = None, code=None, type_: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


def _is_type_error(err: dict) -> bool:
    return err.get("type", "").endswith("_type")


def validation_message(e: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    """One message for all of a validation error's errors, and the first field it names."""
    parts: list[str] = []
    first_loc = None
    unions: dict[str, list[dict]] = {}  # a union-typed field: one error per member
    for err in e.errors():
        loc_t = [x for x in err.get("loc", ()) if x != "body"]
        if loc_t and loc_t[0] in _JOB_TAGS:
            loc_t = loc_t[1:]
        tag_at = next((i for i, x in enumerate(loc_t) if _is_union_tag(x)), None)
        if tag_at is not None:
            name = prefix + ".".join(str(x) for x in loc_t[:tag_at])
            unions.setdefault(name, []).append({**err, "tag": str(loc_t[tag_at])})
            continue
        loc = ".".join(str(x) for x in loc_t)
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        if first_loc is None:
            first_loc = loc or None
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    for name, errs in unions.items():
        first_loc = first_loc or name
        specific = [x for x in errs if not _is_type_error(x)]
        if specific:  # the value had the right type but broke a rule (too long, invalid Unicode, ...)
            parts.extend(dict.fromkeys(f"{name}: {x.get('msg', 'invalid')}" for x in specific))
        else:
            parts.append(f"{name}: wrong type; expected one of {' | '.join(dict.fromkeys(x['tag'] for x in errs))}")
    return "; ".join(parts) or str(e), first_loc


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method of every route at this path (Starlette's Allow names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS
                     if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes))


def install_error_handlers(app: FastAPI, fleet_error: type[Exception]) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            ctx = errs[0].get("ctx") or {}
            return error_response(400, f"malformed JSON body: {ctx.get('error', 'JSON decode error')}")
        msg, param = validation_message(exc)  # type: ignore[arg-type]
        return error_response(400, msg, param)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error_response(exc.status_code, exc.message, exc.param, exc.code, headers=exc.headers)

    @app.exception_handler(fleet_error)
    async def _fleet(request: Request, exc):
        return error_response(exc.status_code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
