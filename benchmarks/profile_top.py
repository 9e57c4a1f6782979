"""Summarise a py-spy raw (collapsed) profile: inclusive share per function, optional focus frame."""
import collections
import sys
from pathlib import Path

path = sys.argv[1]
focus = sys.argv[2] if len(sys.argv) > 2 else None
depth = int(sys.argv[3]) if len(sys.argv) > 3 else 2
inclusive, below, total = collections.Counter(), collections.Counter(), 0
for line in Path(path).read_text().splitlines():
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    total += n
    frames = stack.split(";")
    for f in set(frames):
        inclusive[f] += n
    if focus:
        hits = [i for i, f in enumerate(frames) if focus in f]
        if hits:
            below[";".join(frames[hits[0] + 1: hits[0] + 1 + depth])] += n
print(f"{total} samples")
if focus:
    for k, n in below.most_common(25):
        print(f"{100 * n / total:5.1f}% {k[:260]}")
else:
    for k, n in inclusive.most_common(40):
        print(f"{100 * n / total:5.1f}% {k[:200]}")
