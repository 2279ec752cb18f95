"""Running one batch: validate its input file, feed its lines to the fleet (at most `batch_max_in_flight`
at once, at `batch_priority`), record each line's output line once, then write the output and error files.

Each line runs exactly as the interactive endpoint would run it: the same body models, the same request
preparation (gateway/prepare.py), the same output processor and follower (gateway/follow.py) and the same
response builders. A line's request id is `{batch_id}-{index}`: a runner that resumes a batch (its
predecessor died) skips recorded lines and re-attaches to lines already submitted, reading their output
streams from the start, so no line is lost and none runs twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from pydantic import ValidationError

from gateway.api_models import ChatCompletionRequest, CompletionRequest
from gateway.auth import record_request_owners
from gateway.batch import store
from gateway.batch.lines import BatchLine, error_line, parse_lines, response_line
from gateway.errors import BadRequest, validation_message
from gateway.file_store import FileStore
from gateway.fleet import FleetClient, FleetError
from gateway.follow import follow
from gateway.prepare import Prepared, prepare_chat, prepare_completion, processors
from gateway.responses import TokenText, chat_response, completion_response, make_request
from protocol import streams as S
from protocol.redis_conn import OUTAGE_ERRORS

log = logging.getLogger("pagedfleet.batch")

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
WATCH_S = 0.25


def _error_body(message: str, param: str | None = None, code=None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BatchRunner:
    def __init__(self, fleet: FleetClient, files: FileStore, batch_id: str):
        self.fleet, self.r, self.files = fleet, fleet.redis, files
        self.settings = fleet.settings
        self.batch_id = batch_id
        self.token = uuid.uuid4().hex
        self.tt = TokenText(fleet.model.tokenizer)
        self.stop_reason: str | None = None
        self.meta: dict = {}
        self.owner = ""

    # ---- the lease ------------------------------------------------------------------------------
    async def acquire(self) -> bool:
        ms = int(self.settings.batch_lease_s * 1000)
        if not await self.r.set(store.lease_key(self.batch_id), self.token, nx=True, px=ms):
            return False
        await self.r.delete(store.queued_key(self.batch_id))
        return True

    async def release(self) -> None:
        await self.r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                          "return 0", 1, store.lease_key(self.batch_id), self.token)

    async def _watch(self, tasks: set[asyncio.Task]) -> None:
        """Renew the lease; on a cancel, the window's end or a lost lease, stop the lines in flight."""
        ms = int(self.settings.batch_lease_s * 1000)
        while self.stop_reason is None:
            await asyncio.sleep(WATCH_S)
            try:
                if not await self.r.eval(RENEW_LUA, 1, store.lease_key(self.batch_id), self.token, ms):
                    self.stop_reason = "lease_lost"
                elif await self.r.hget(store.batch_key(self.batch_id), "status") == "cancelling":
                    self.stop_reason = "cancelled"
                elif time.time() > self.meta["expires_at"]:
                    self.stop_reason = "expired"
            except OUTAGE_ERRORS as e:  # Redis away: the lines wait for it too; try again
                log.warning("batch %s: redis unavailable: %s", self.batch_id, e)
        for t in list(tasks):
            t.cancel()

    # ---- the batch ------------------------------------------------------------------------------
    async def run(self) -> str | None:
        raw = await store.get_batch(self.r, self.batch_id)
        if raw is None or raw["status"] in store.TERMINAL:
            return None
        self.meta, self.owner = json.loads(raw["meta"]), raw.get("owner", "")
        if raw["status"] == "cancelling":
            return await self.finish("cancelled")
        lines = await self._input_lines()
        if lines is None:
            return "failed"
        if raw["status"] == "validating" and not await self._validate(lines):
            return "failed"
        if await self.r.hget(store.batch_key(self.batch_id), "status") == "cancelling":
            return await self.finish("cancelled")  # cancelled while validating
        if raw["status"] in ("validating", "in_progress"):
            done = set(await self.r.hkeys(store.results_key(self.batch_id)))
            await self._run_lines([ln for ln in lines if str(ln.index) not in done])
            if self.stop_reason == "lease_lost":
                return None
            if not self.stop_reason and await self.r.hlen(store.results_key(self.batch_id)) < len(lines):
                raise RuntimeError(f"batch {self.batch_id}: lines left unrecorded; it resumes on the next run")
            if self.stop_reason == "expired":
                await self._expire_rest(lines)
            if self.stop_reason:
                return await self.finish(self.stop_reason)
        await store.set_status(self.r, self.batch_id, "finalizing", unless=store.TERMINAL + ("cancelling",))
        return await self.finish("completed")

    async def _fail(self, code: str, message: str, line: int | None = None) -> None:
        errors = [{"code": code, "message": message, "line": line, "param": None}]
        await store.set_status(self.r, self.batch_id, "failed", errors=json.dumps(errors))

    async def _input_lines(self) -> list[BatchLine] | None:
        fid = self.meta["input_file_id"]
        data = await self.files.read(fid)
        if data is None:
            await self._fail("invalid_file", f"input file {fid} no longer exists")
            return None
        lines = parse_lines(data.decode("utf-8", "replace"), self.meta["endpoint"])
        if len(lines) > self.settings.max_batch_lines:
            await self._fail("too_many_requests", f"the input file has {len(lines)} requests; a batch takes at "
                                                  f"most {self.settings.max_batch_lines}")
            return None
        return lines

    async def _validate(self, lines: list[BatchLine]) -> bool:
        bad = [ln for ln in lines if ln.error]
        if len(bad) == len(lines):
            first = bad[0] if bad else None
            await self._fail("invalid_file", first.error if first else "the input file holds no requests",
                             first.index + 1 if first else None)
            return False
        for ln in bad:
            await store.record_line(self.r, self.batch_id, ln.index, error_line(ln.custom_id, "invalid_request",
                                                                                ln.error), ok=False)
        await self.r.hset(store.batch_key(self.batch_id), "total", len(lines))
        await store.set_status(self.r, self.batch_id, "in_progress",
                               unless=store.TERMINAL + ("cancelling", "in_progress"))
        return True

    async def _run_lines(self, pending: list[BatchLine]) -> None:
        sem = asyncio.Semaphore(self.settings.batch_max_in_flight)
        tasks: set[asyncio.Task] = set()
        watcher = asyncio.create_task(self._watch(tasks))
        try:
            for line in pending:
                await sem.acquire()
                if self.stop_reason:
                    break
                t = asyncio.create_task(self._line(line))
                tasks.add(t)
                t.add_done_callback(lambda t: (tasks.discard(t), sem.release()))
            while tasks and not self.stop_reason:
                await asyncio.wait(set(tasks), timeout=WATCH_S)
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.stop_reason = self.stop_reason or "done"
            await asyncio.gather(watcher, return_exceptions=True)
            if self.stop_reason == "done":
                self.stop_reason = None

    async def _expire_rest(self, lines: list[BatchLine]) -> None:
        done = set(await self.r.hkeys(store.results_key(self.batch_id)))
        for ln in lines:
            if str(ln.index) not in done:
                await store.record_line(self.r, self.batch_id, ln.index, error_line(
                    ln.custom_id, "batch_expired", "This request could not be executed before the completion "
                    "window expired."), ok=False)

    # ---- one line -------------------------------------------------------------------------------
    async def _line(self, line: BatchLine) -> None:
        out, ok = await self._execute(line)
        await store.record_line(self.r, self.batch_id, line.index, out, ok)

    async def _prepare(self, line: BatchLine, rid: str):
        chat = self.meta["endpoint"] == "/v1/chat/completions"
        model = ChatCompletionRequest if chat else CompletionRequest
        body = model.model_validate_json(json.dumps(line.body))  # the interactive endpoint's JSON validation
        if body.stream:
            raise BadRequest("stream: a batch request cannot stream", "stream")
        prep = await (prepare_chat(self.fleet, body, rid) if chat else prepare_completion(self.fleet, body, rid))
        prep.priority = max(prep.priority, self.settings.batch_priority)
        return body, prep

    async def _execute(self, line: BatchLine) -> tuple[dict, bool]:
        rid = f"{self.batch_id}-{line.index}"
        try:
            body, prep = await self._prepare(line, rid)
        except ValidationError as e:
            msg, param = validation_message(e)
            return response_line(line.custom_id, rid, 400, _error_body(msg, param)), False
        except BadRequest as e:
            return response_line(line.custom_id, rid, e.status_code, _error_body(e.message, e.param, e.code)), False
        procs = processors(self.fleet, prep, body.include_stop_str_in_output)
        try:
            await self._submit_once(line.index, prep)
            await asyncio.gather(*(self._drain(p) for p in procs))
        except FleetError as e:
            return response_line(line.custom_id, rid, e.status_code, _error_body(str(e), type_="server_error")), False
        except asyncio.CancelledError:
            if self.stop_reason != "lease_lost":
                for p in procs:
                    if not p.finished:
                        await self.fleet.abort(p.request_id, f"batch {self.stop_reason}")
            raise
        errors = [p.error for p in procs if p.error]
        if errors:
            return response_line(line.custom_id, rid, 500, _error_body(f"request failed: {errors[0]}",
                                                                       type_="server_error")), False
        if isinstance(body, ChatCompletionRequest):
            resp = chat_response(rid, prep.model, procs[0], self.tt, body.logprobs)
        else:
            resp = completion_response(rid, prep.model, procs, self.tt, body.logprobs is not None)
        return response_line(line.custom_id, rid, 200, resp.model_dump(mode="json")), True

    async def _drain(self, proc) -> None:
        async for _ in follow(self.fleet, proc):
            pass

    async def _submit_once(self, index: int, prep: Prepared) -> None:
        """Submit the line's requests unless a predecessor did (then its output streams are followed)."""
        if await self.r.hexists(store.submitted_key(self.batch_id), str(index)):
            return
        await record_request_owners(self.r, self.settings.job_ttl_s, self.owner, prep.request_ids)
        async with self.r.pipeline(transaction=True) as p:
            for rid, ids in zip(prep.request_ids, prep.prompts):
                req = make_request(rid, ids, prep.params, prep.priority)
                p.xadd(S.REQUESTS, S.encode(S.RequestCommand(op="add", request_id=rid, request=req)))
            p.hset(store.submitted_key(self.batch_id), str(index), "1")
            await p.execute()

    # ---- the end --------------------------------------------------------------------------------
    async def finish(self, status: str) -> str:
        """Write the output file (lines that got a 200) and the error file (the rest), then end the batch."""
        results = await self.r.hgetall(store.results_key(self.batch_id))
        ordered = [json.loads(v) for _, v in sorted(results.items(), key=lambda kv: int(kv[0]))]
        good = [x for x in ordered if x.get("response") and x["response"]["status_code"] == 200]
        bad = [x for x in ordered if not (x.get("response") and x["response"]["status_code"] == 200)]
        out_id, err_id = store.output_file_ids(self.batch_id)
        ids = {}
        for fid, rows, name, key in ((out_id, good, "output", "output_file_id"), (err_id, bad, "errors",
                                                                                  "error_file_id")):
            if rows:
                data = "".join(json.dumps(x) + "\n" for x in rows).encode()
                await self.files.create(self.owner, f"{self.batch_id}_{name}.jsonl", "batch_output", data, fid,
                                        ttl_s=store.RECORD_TTL_S)
                ids[key] = fid
        await store.set_status(self.r, self.batch_id, status, **ids)
        log.info("batch %s %s: %d ok, %d failed", self.batch_id, status, len(good), len(bad))
        return status
