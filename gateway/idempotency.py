"""`Idempotency-Key` on POST /v1/jobs and POST /v1/batches (draft-ietf-httpapi-idempotency-key-header).

A client whose creation got no answer (a timeout, a gateway that died mid-request) retries with the same key
and gets the job or batch its first try made, never a second one. The key is recorded per owner (another
API key's equal key is another key) with a fingerprint of the body, in the same Redis transaction that
creates the object: a key never names a half-made object, so there is no "in progress" state to wait out.
The same key with another body is a 422. A record lives as long as the object it names.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, NamedTuple

from fastapi import Depends, Header
from redis.exceptions import WatchError

from gateway.api_models import ErrorResponse
from gateway.errors import BadRequest

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # "true" on an answer that names what an earlier request made
MAX_KEY_LEN = 255
IDEMPOTENT_ERRORS = {409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}  # for a route's OpenAPI
ATTEMPTS = 8  # tries of a WATCHed creation that lose a race before the winner's record is read


def _key_header(idempotency_key: Annotated[str | None, Header(alias=HEADER)] = None) -> str | None:
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY_LEN:
        raise BadRequest(f"{HEADER}: must be 1 to {MAX_KEY_LEN} characters", HEADER, 400, "invalid_idempotency_key")
    return idempotency_key


KeyHeader = Annotated[str | None, Depends(_key_header)]


class Idempotency(NamedTuple):
    redis_key: str
    fingerprint: str


def idempotency(kind: str, owner: str, key: str | None, body: dict) -> Idempotency | None:
    """The record of `key` for this owner and kind of object ("jobs", "batches"); None without a key."""
    if key is None:
        return None
    digest = hashlib.sha256(key.encode()).hexdigest()
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Idempotency(f"pf:idem:{kind}:{owner}:{digest}", fingerprint)


def _made(raw, idem: Idempotency) -> str | None:
    """The id a key's record names (None: no record); a 422 when the record was made with another body."""
    if raw is None:
        return None
    made = json.loads(raw)
    if made["fingerprint"] != idem.fingerprint:
        raise BadRequest(f"{HEADER}: this key was used with a different request body; a retry must send the same "
                         "body, a new request a new key", HEADER, 422, "idempotency_key_reused")
    return made["id"]


async def made_with(redis, idem: Idempotency | None) -> str | None:
    """The id of the object already made with this key, if any: a retry answers from it before any work (a
    job's tokenizing, its token-rate charge). create_once checks again, atomically."""
    return None if idem is None else _made(await redis.get(idem.redis_key), idem)


async def create_once(redis, idem: Idempotency | None, new_id: str, queue_creation, ttl_s: int) -> tuple[str, bool]:
    """Create an object (`queue_creation(pipe)` queues its commands in a MULTI) unless `idem` names one already.

    Returns (the object's id, whether it already existed). Two requests with one key race through WATCH: the
    loser's transaction fails and it reads the winner's record."""
    for _ in range(ATTEMPTS):
        async with redis.pipeline(transaction=True) as p:
            if idem is not None:
                await p.watch(idem.redis_key)
                made = _made(await p.get(idem.redis_key), idem)
                if made is not None:
                    return made, True
            p.multi()
            queue_creation(p)
            if idem is not None:
                p.set(idem.redis_key, json.dumps({"id": new_id, "fingerprint": idem.fingerprint}), ex=ttl_s)
            try:
                await p.execute()
            except WatchError:
                continue
            return new_id, False
    raise BadRequest(f"{HEADER}: requests with this key keep racing; retry", HEADER, 409, "idempotency_conflict")
