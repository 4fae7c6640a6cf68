"""``jtml index``: one CSV row per frame over one or more studies, split by study by default.

The split actually made (per split: frames, their share, the studies) goes to stderr, with a
one-line warning when it misses the requested fractions by more than
:data:`jtml.data.index.SPLIT_TOLERANCE` or half a split unit's share (3 studies cannot be
split 70/20/10: each split gets a whole study).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from jtml.data.index import SPLIT_BY, SPLITS, build_index, summarize_split, write_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", nargs="+", required=True, metavar="DIR", help="study folders")
    parser.add_argument("--out", required=True, help="index CSV to write")
    parser.add_argument("--val", type=float, default=0.2, help="validation fraction (default 0.2)")
    parser.add_argument("--test", type=float, default=0.1, help="test fraction (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--split-by",
        choices=SPLIT_BY,
        default="study",
        help="study (default): frames of one subject never straddle splits; frame: split frames",
    )


def run(args: argparse.Namespace) -> int:
    rows = build_index(args.studies, args.val, args.test, args.seed, args.split_by)
    write_index(args.out, rows)
    counts = Counter(r.split for r in rows)
    summary = summarize_split(rows, args.val, args.test, args.split_by)
    studies = len({r.study for r in rows})
    print(
        f"wrote {args.out}: {len(rows)} frames from {studies} stud{'y' if studies == 1 else 'ies'}", end="; "
    )
    print(", ".join(f"{k} {counts.get(k, 0)}" for k in SPLITS))
    print("\n".join(summary.lines()), file=sys.stderr)
    if (warning := summary.warning()) is not None:
        print(warning, file=sys.stderr)
    return 0
