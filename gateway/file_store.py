"""Files of the Files API (`purpose` "batch" uploads, "batch_output" results), in Redis or a directory.

A file's record is the hash `pf:file:{id}` (its OpenAI `FileObject` as JSON and its owner); its bytes are
the string `pf:file:{id}:data` or, with `files_dir` set, the file `{files_dir}/{id}` (written whole to a
temporary name, then renamed: a reader never sees half a file). Ids are `file-` + 32 random hex digits.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from anyio import to_thread

from gateway.listing import add_to_index, owner_index, page

UPLOAD_PURPOSES = ("batch",)
INDEX_TTL_S = 400 * 24 * 3600


def file_key(file_id: str) -> str:
    return f"pf:file:{file_id}"


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    def __init__(self, redis, settings):
        self.redis = redis
        self.dir = Path(settings.files_dir) if settings.files_dir else None

    async def create(self, owner: str, filename: str, purpose: str, data: bytes, file_id: str | None = None,
                     ttl_s: int | None = None) -> dict:
        """Store `data` and return its FileObject. A given `file_id` (batch outputs) is overwritten. With
        `ttl_s` the record (and, in Redis, the bytes) expire; uploads are kept until deleted."""
        file_id = file_id or new_file_id()
        now = int(time.time())
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": now,
               "filename": filename, "purpose": purpose, "status": "processed",
               "expires_at": now + ttl_s if ttl_s else None, "status_details": None}
        if self.dir is not None:
            await to_thread.run_sync(self._write, file_id, data)
        async with self.redis.pipeline(transaction=True) as p:
            if self.dir is None:
                p.set(f"{file_key(file_id)}:data", data, ex=ttl_s)
            p.hset(file_key(file_id), mapping={"object": json.dumps(obj), "owner": owner})
            if ttl_s:
                p.expire(file_key(file_id), ttl_s)
            await p.execute()
        await add_to_index(self.redis, owner_index("files", owner), file_id, time.time(), INDEX_TTL_S)
        return obj

    def _write(self, file_id: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{file_id}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / file_id)

    async def get(self, file_id: str, owner: str) -> dict | None:
        """The FileObject, if the file exists and `owner` owns it (else None: the caller says 404)."""
        raw = await self.redis.hgetall(file_key(file_id))
        if not raw or raw.get("owner") != owner:
            return None
        return json.loads(raw["object"])

    async def read(self, file_id: str) -> bytes | None:
        if self.dir is not None:
            path = self.dir / file_id
            return await to_thread.run_sync(lambda: path.read_bytes() if path.exists() else None)
        data = await self.redis.get(f"{file_key(file_id)}:data")
        return data.encode("utf-8") if isinstance(data, str) else data

    async def delete(self, file_id: str, owner: str) -> None:
        await self.redis.delete(file_key(file_id), f"{file_key(file_id)}:data")
        await self.redis.zrem(owner_index("files", owner), file_id)
        if self.dir is not None:
            await to_thread.run_sync(lambda: (self.dir / file_id).unlink(missing_ok=True))

    async def list(self, owner: str, limit: int, after: str | None, purpose: str | None) -> dict:
        async def load(ids: list[str]) -> list[dict | None]:
            async with self.redis.pipeline(transaction=False) as p:
                for i in ids:
                    p.hget(file_key(i), "object")
                raw = await p.execute()
            return [json.loads(r) if r else None for r in raw]

        return await page(self.redis, owner_index("files", owner), limit, after, load,
                          lambda f: purpose is None or f["purpose"] == purpose)
