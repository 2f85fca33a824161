#!/usr/bin/env python3
"""Top functions by self and cumulative samples from py-spy's raw (collapsed-stack) output.

    .venv/bin/python bench/run.py --no-etcd --workloads 2 --levels 64 --py-spy /tmp/kine.txt
    .venv/bin/python bench/profile_summary.py /tmp/kine.txt [--top 15] [--thread MainThread]

Each line of the input is `frame;frame;...;leaf COUNT`, outermost frame first; with py-spy's
--threads the first frame names the thread. A function is `name (file)`, line numbers dropped,
so self time is the samples whose leaf is the function and cumulative time the samples whose
stack contains it at least once (recursion counted once). Percentages are of all samples shown,
which py-spy takes only from threads that were running (not idle) unless it was given --idle.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

#: Frames every sample of the main thread has: they say nothing about where time goes.
_ENTRY_FRAMES = ("cli.py)", "__main__.py)")
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def function(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    name, path = match.groups()
    return f"{name} ({path})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--thread", help="only stacks of threads whose name contains this")
    parser.add_argument(
        "--package",
        default="kine_server/",
        help="also attribute each sample to the innermost frame from this path prefix "
        "(default kine_server/), or to the leaf's module when there is none",
    )
    args = parser.parse_args(argv)

    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.path) as lines:
        for line in lines:
            match = _LINE.match(line.rstrip("\n"))
            if not match:
                continue
            stack, count = match.group(1), int(match.group(2))
            frames = stack.split(";")
            thread = ""
            if frames and frames[0].startswith("thread ("):
                thread = frames[0]
                if len(frames) > 1 and not _FRAME.match(frames[1]):
                    thread += " " + frames[1]
                    frames = frames[2:]
                else:
                    frames = frames[1:]
            if args.thread and args.thread not in thread:
                continue
            threads[thread] += count
            total += count
            names = [function(f) for f in frames]
            if names:
                own[names[-1]] += count
            for name in set(names):
                cumulative[name] += count
            ours = [n for n in names if f"({args.package}" in n and not n.endswith(_ENTRY_FRAMES)]
            if ours:
                innermost[ours[-1]] += count
            elif names:
                leaf = names[-1]
                innermost[f"(no {args.package} frame) leaf in ({leaf.rsplit('(', 1)[-1]}"] += count

    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    print("\nby thread:")
    for thread, n in threads.most_common():
        print(f"  {n / total:6.1%}  {n:6d}  {thread or '(no thread frame)'}")
    titles = (
        ("self", own),
        ("cumulative", cumulative),
        (f"innermost {args.package} frame", innermost),
    )
    for title, counter in titles:
        print(f"\ntop {args.top} by {title}:")
        for name, n in counter.most_common(args.top):
            print(f"  {n / total:6.1%}  {n:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
