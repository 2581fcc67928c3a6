"""Where a process's time went, from a py-spy raw profile (``bench.run --py-spy``).

    python -m bench.pyspy_summary bench/results/<label>-I-queue-pyspy.txt [--top 40]

Prints the share of samples each function appears in (inclusive: a function and what it
called) and the functions the samples ended in (self). With ``--gil`` profiles, a sample is
a moment some thread held the GIL, so the shares are of the process's one GIL.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines merged per function."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})" if where else func


def summarize(path: Path) -> tuple[int, Counter, Counter]:
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    total, inclusive, own = summarize(args.profile)
    print(f"{total} samples")
    print("inclusive:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f} %  {name}")
    print("self:")
    for name, n in own.most_common(args.top // 2):
        print(f"  {100 * n / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
