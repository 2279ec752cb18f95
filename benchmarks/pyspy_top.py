"""The heaviest functions of a py-spy raw profile (`py-spy record -f raw`: one collapsed stack and its sample
count per line), per thread: inclusive and self sample counts.

    python benchmarks/pyspy_top.py PROFILE.raw [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(a.raw, errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if "process" not in frames[0] else ";".join(frames[:2])
        body = frames[2:] if "process" in frames[0] else frames[1:]
        totals[thread] += int(n)
        for f in set(body):
            incl[thread][f] += int(n)
        if body:
            own[thread][body[-1]] += int(n)
    for thread, total in totals.most_common():
        print(json.dumps({"thread": thread[:160], "samples": total,
                          "inclusive": incl[thread].most_common(a.top), "self": own[thread].most_common(a.top)}))


if __name__ == "__main__":
    main()
