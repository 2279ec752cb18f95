"""Bounded streams without dropping unacknowledged entries (the scheduler every 10 s, housekeeping too)."""

from __future__ import annotations


def _id_tuple(entry_id) -> tuple[int, int]:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = str(entry_id).partition("-")
    return int(ms), int(seq or 0)


def safe_trim_minid(r, stream: str, maxlen: int) -> str | None:
    """Trim ``stream`` (sync client) to about ``maxlen`` entries, never past an entry that some consumer
    group has not yet been delivered or has not acknowledged. Returns the MINID used, or None."""
    try:
        length = r.xlen(stream)
    except Exception:
        return None
    if length <= maxlen:
        return None
    # the id of the entry that keeps the newest `maxlen` entries
    tail = r.xrevrange(stream, "+", "-", count=maxlen)
    if not tail:
        return None
    floor = _id_tuple(tail[-1][0])
    try:
        groups = r.xinfo_groups(stream)
    except Exception:
        groups = []
    for g in groups:
        name = g["name"]
        last = g.get("last-delivered-id")
        if last is not None:
            # entries after last-delivered are unread: keep them (their id > last)
            lt = _id_tuple(last)
            nxt = (lt[0], lt[1] + 1)
            floor = min(floor, nxt)
        if int(g.get("pending", 0)):
            summary = r.xpending(stream, name)
            if summary and summary.get("min"):
                floor = min(floor, _id_tuple(summary["min"]))
    minid = f"{floor[0]}-{floor[1]}"
    r.xtrim(stream, minid=minid, approximate=False)
    return minid
