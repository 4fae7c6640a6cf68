"""``jtml index``: one CSV row per frame over one or more studies, split by study by default."""

from __future__ import annotations

import argparse
from collections import Counter

from jtml.data.index import SPLIT_BY, build_index, write_index


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
    studies = {
        s: sorted({r.split for r in rows if r.study == s}) for s in dict.fromkeys(r.study for r in rows)
    }
    print(f"wrote {args.out}: {len(rows)} frames from {len(studies)} studies", end="; ")
    print(", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test")))
    return 0
