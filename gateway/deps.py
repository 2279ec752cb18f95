"""FastAPI dependencies: what a route needs from the app's state, and the JSON-body guard."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from gateway.errors import BadRequest
from gateway.fleet import FleetClient
from gateway.responses import TokenText
from gateway.settings import GatewaySettings


def get_fleet(request: Request) -> FleetClient:
    return request.app.state.fleet


def get_token_text(request: Request) -> TokenText:
    return request.app.state.token_text


def get_metrics(request: Request) -> Any:
    return request.app.state.metrics


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def require_json(request: Request) -> None:
    """Bodies are JSON: another media type is a 415 that says so (not a confusing type error)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise BadRequest(f"Content-Type must be application/json, not {ctype or 'missing'}", None, 415,
                         "unsupported_media_type")


Fleet = Annotated[FleetClient, Depends(get_fleet)]
Texts = Annotated[TokenText, Depends(get_token_text)]
Metrics = Annotated[Any, Depends(get_metrics)]
JsonBody = Depends(require_json)
