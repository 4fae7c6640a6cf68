"""``jtml runs [LOGDIR]``: compare the runs under a log directory.

One row per run directory (``run.json`` + ``config.yaml``): its status, only the config keys
whose values differ between the listed runs, and the final and best value of one metric (read
from the W&B offline run, or a CSV logger's ``metrics.csv``). ``--json`` prints one JSON list;
``--plot`` draws the metric's curve per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jtml.errors import JTMLError
from jtml.runs import RunInfo, config_differences, find_run_dirs, read_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", nargs="?", default="runs", help="folder of run directories (default: runs)")
    parser.add_argument("--metric", default="val/dice_mean", help="metric to compare")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="which value is best")
    parser.add_argument("--plot", type=Path, help="write a PNG of the metric's curve per run")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def _final_values(run: RunInfo, prefix: str = "val/") -> dict[str, float]:
    """Last logged value of every scalar ``prefix*`` metric (history first, then run.json)."""
    out: dict[str, float] = {}
    for row in run.history:
        for k, v in row.items():
            scalar = isinstance(v, (int, float)) and not isinstance(v, bool)
            if scalar and k.startswith(prefix) and "/" not in k[len(prefix) :]:  # not val/overlays/count
                out[k] = float(v)
    for k, v in (run.record.get("metrics") or {}).items():
        if k.startswith(prefix) and v is not None:
            out.setdefault(k, float(v))
    return dict(sorted(out.items()))


def summarize(run: RunInfo, diff: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    series = run.series(metric)
    recorded = (run.record.get("metrics") or {}).get(metric)
    values = [v for _, v in series] or ([float(recorded)] if recorded is not None else [])
    pick = max if mode == "max" else min
    best = pick(values) if values else None
    final = _final_values(run, metric.split("/", 1)[0] + "/" if "/" in metric else "")
    final.setdefault(metric, values[-1]) if values else None
    return {
        "run_dir": str(run.run_dir.resolve()),
        "status": run.status,
        "config_diff": diff,
        "final": final,
        "best": {metric: best} if best is not None else {},
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["config_diff"]})
    header = ["run", "status", *keys, f"final {metric}", f"best {metric}"]
    body = [
        [
            Path(r["run_dir"]).parent.name + "/" + Path(r["run_dir"]).name,
            r["status"],
            *(_fmt(r["config_diff"].get(k)) for k in keys),
            _fmt(r["final"].get(metric)),
            _fmt(r["best"].get(metric)),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[Any]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join(line(cells) for cells in [header, *body])


def plot(runs: list[RunInfo], labels: list[str], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label in zip(runs, labels, strict=True):
        series = run.series(metric)
        if series:
            ax.plot([s for s, _ in series], [v for _, v in series], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    runs = [read_run(d) for d in find_run_dirs(args.logdir)]
    diffs = config_differences([r.config for r in runs])
    rows = [summarize(r, d, args.metric, args.mode) for r, d in zip(runs, diffs, strict=True)]
    if args.plot:
        if not any(r.series(args.metric) for r in runs):
            raise JTMLError(f"no run logged {args.metric!r}: nothing to plot", args.logdir)
        labels = [
            Path(r["run_dir"]).name + (" " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["config_diff"].items()))
            for r in rows
        ]
        plot(runs, labels, args.metric, args.plot)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows, args.metric))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
