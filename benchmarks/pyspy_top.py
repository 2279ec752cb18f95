"""The heaviest functions of a py-spy raw profile (`py-spy record -f raw`: one collapsed stack and its sample
count per line), per process (and thread, with `--threads`): inclusive and self sample counts.

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
        # with --subprocesses a child's stacks sit under its parents' "process PID:cmdline" frames: the
        # innermost one names the process (and with --threads the frame after it the thread)
        procs = [i for i, f in enumerate(frames) if f.startswith("process ")]
        cut = procs[-1] + 1 if procs else 0
        if cut < len(frames) and frames[cut].startswith("thread "):
            cut += 1
        thread = ";".join(frames[procs[-1] if procs else 0:cut]) or frames[0]
        body = frames[cut:]
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
