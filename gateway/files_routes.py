"""The Files API: POST /v1/files (multipart: `file`, `purpose` "batch"), GET /v1/files (paginated),
GET /v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id}. A file is visible only to the key
that made it (another key gets 404). Uploads are UTF-8 JSONL of at most `max_file_bytes` (413 past it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from gateway.auth import Owner
from gateway.errors import BadRequest
from gateway.file_store import UPLOAD_PURPOSES, FileStore
from gateway.routes import ERRORS

router = APIRouter(tags=["files"])


def get_files(request: Request) -> FileStore:
    return request.app.state.files


Files = Annotated[FileStore, Depends(get_files)]


async def owned_file(files: FileStore, file_id: str, owner: str) -> dict:
    obj = await files.get(file_id, owner)
    if obj is None:
        raise BadRequest(f"No such File object: {file_id}", "file_id", 404, "file_not_found")
    return obj


@router.post("/v1/files", responses=ERRORS)
async def upload_file(request: Request, files: Files, owner: Owner, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> dict:
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(f"purpose: must be one of {list(UPLOAD_PURPOSES)}, not {purpose!r}", "purpose")
    limit = request.app.state.settings.max_file_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(f"file: larger than the limit of {limit} bytes", "file", 413, "file_too_large")
    if not data.strip():
        raise BadRequest("file: is empty", "file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"file: not UTF-8 text (byte {e.start})", "file") from None
    return await files.create(owner, file.filename or "upload.jsonl", purpose, data)


@router.get("/v1/files", responses=ERRORS)
async def list_files(files: Files, owner: Owner, limit: Annotated[int, Query()] = 20,
                     after: Annotated[str | None, Query()] = None,
                     purpose: Annotated[str | None, Query()] = None) -> dict:
    return await files.list(owner, limit, after, purpose)


@router.get("/v1/files/{file_id}", responses=ERRORS)
async def get_file(file_id: str, files: Files, owner: Owner) -> dict:
    return await owned_file(files, file_id, owner)


@router.get("/v1/files/{file_id}/content", responses=ERRORS)
async def file_content(file_id: str, files: Files, owner: Owner) -> Response:
    await owned_file(files, file_id, owner)
    data = await files.read(file_id)
    if data is None:
        raise BadRequest(f"File {file_id} has no content (it was lost)", "file_id", 404, "file_not_found")
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=ERRORS)
async def delete_file(file_id: str, files: Files, owner: Owner) -> dict:
    await owned_file(files, file_id, owner)
    await files.delete(file_id, owner)
    return {"id": file_id, "object": "file", "deleted": True}
