"""``jtml runs [LOGDIR]``: compare the runs under a log directory.

Runs (directories with ``run.json`` + ``config.yaml``) are grouped by experiment
(``<root>/<experiment>/<run>``): one section per experiment, and in it one table per command
(fit first, then validate, test, predict), so an evaluation run is never read as a fit. Each table
shows the run's status, the config keys whose values differ *within the experiment* (abbreviated,
spelled out below the section), and one metric: final and best for fits, the value for
validate/test runs, which log their own stage (``test`` logs ``test/dice_mean``, not
``val/dice_mean``). Metrics come from the W&B offline run, or a CSV logger's ``metrics.csv``.

``--json`` prints one JSON list, one object per run: ``run_dir``, ``experiment``, ``command``,
``status``, ``metric`` (the one compared for this run), ``config_diff`` (within its experiment),
``final`` and ``best``. ``--plot`` draws the metric's curve per fit run: one subplot per
experiment, the legend outside the axes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write
from jtml.runs.records import RunInfo, config_differences, find_run_dirs, read_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMMANDS = ("fit", "validate", "test", "predict")
STAGE_OF = {"validate": "val", "test": "test"}  # the metric prefix an evaluation command logs
MAX_VALUE_CHARS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", nargs="?", default="runs", help="folder of run directories (default: runs)")
    parser.add_argument("--metric", default="val/dice_mean", help="metric to compare")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="which value is best")
    parser.add_argument("--plot", type=Path, help="write a PNG of the metric's curve per fit run")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def metric_for(command: str, metric: str) -> str:
    """The metric a run of ``command`` logs in place of ``metric``: ``val/x`` or ``test/x`` becomes
    the evaluation command's own stage (``test`` → ``test/x``); fits keep ``metric``."""
    stage, sep, name = metric.partition("/")
    if sep and stage in STAGE_OF.values() and command in STAGE_OF:
        return f"{STAGE_OF[command]}/{name}"
    return metric


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


def summarize(
    run: RunInfo, diff: dict[str, Any], metric: str, mode: str, experiment: str | None = None
) -> dict[str, Any]:
    """One run's JSON object; ``metric`` is translated to the run's own stage (:func:`metric_for`)."""
    metric = metric_for(run.command, metric)
    series = run.series(metric)
    recorded = (run.record.get("metrics") or {}).get(metric)
    values = [v for _, v in series] or ([float(recorded)] if recorded is not None else [])
    pick = max if mode == "max" else min
    best = pick(values) if values else None
    final = _final_values(run, metric.split("/", 1)[0] + "/" if "/" in metric else "")
    if values:
        final.setdefault(metric, values[-1])
    return {
        "run_dir": str(run.run_dir.resolve()),
        "experiment": experiment if experiment is not None else run.experiment,
        "command": run.command,
        "status": run.status,
        "metric": metric,
        "config_diff": diff,
        "final": final,
        "best": {metric: best} if best is not None else {},
    }


def group_runs(runs: list[RunInfo], logdir: str | Path) -> dict[str, list[RunInfo]]:
    """Runs by experiment folder, in order of first appearance; an experiment is named by its path
    below ``logdir`` (``demo_seg``, or ``old/demo_seg`` when two roots hold one of that name)."""
    base = Path(logdir).resolve()
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        parent = run.run_dir.resolve().parent
        name = (
            str(parent.relative_to(base)) if parent != base and parent.is_relative_to(base) else parent.name
        )
        groups.setdefault(name, []).append(run)
    return groups


def short_keys(keys: list[str]) -> dict[str, str]:
    """Per dotted config key the shortest suffix, ``init_args`` left out, that no other key shares:
    ``model.init_args.optimizer.init_args.lr`` → ``lr`` (``optimizer.lr`` beside a scheduler's lr)."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] or [k] for k in keys}
    out: dict[str, str] = {}
    for key, mine in parts.items():
        for n in range(1, len(mine) + 1):
            if all(other[-n:] != mine[-n:] for k, other in parts.items() if k != key):
                out[key] = ".".join(mine[-n:])
                break
        else:
            out[key] = key
    if len(set(out.values())) < len(out):  # cannot happen by construction; never show one name twice
        return {k: k for k in keys}
    return out


def _fmt(value: Any, key: str = "") -> str:
    """A table cell / legend value: ``.4g`` floats, a class path's class name, long values cut short
    (at the front: the end of a path tells most); ``--json`` has them in full."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if key.endswith("class_path"):
        text = text.rsplit(".", 1)[-1]
    return text if len(text) <= MAX_VALUE_CHARS else "…" + text[-(MAX_VALUE_CHARS - 1) :]


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *body]
    ]


def _is_fit(command: str) -> bool:
    """A training run (``fit``, or a record too old to say): the one whose curve is plotted."""
    return command not in ("validate", "test", "predict")


def _command_order(command: str) -> tuple[int, str]:
    return (COMMANDS.index(command) if command in COMMANDS else len(COMMANDS), command)


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """One section per experiment: a title line, one table per command, the abbreviated keys."""
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_experiment.setdefault(r["experiment"], []).append(r)
    sections = []
    for experiment, group in by_experiment.items():
        commands = sorted(Counter(r["command"] for r in group).items(), key=lambda kv: _command_order(kv[0]))
        lines = [f"{experiment}: " + ", ".join(f"{n} {c}" for c, n in commands)]
        keys = sorted({k for r in group for k in r["config_diff"]})
        short = short_keys(keys)
        for command, _ in commands:
            runs = [r for r in group if r["command"] == command]
            m = metric_for(command, metric)
            header = [command, "status", *(short[k] for k in keys)]
            if command == "predict":
                scores: list[str] = []
            elif command in STAGE_OF:  # one evaluation: one value
                header.append(m)
                scores = ["final"]
            else:
                header += [f"final {m}", f"best {m}"]
                scores = ["final", "best"]
            body = [
                [
                    Path(r["run_dir"]).name,
                    r["status"],
                    *(_fmt(r["config_diff"].get(k), k) for k in keys),
                    *(_fmt(r[s].get(m)) for s in scores),
                ]
                for r in runs
            ]
            lines += ["  " + ln for ln in _grid(header, body)]
        lines += [f"  {short[k]} = {k}" for k in keys if short[k] != k]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _label(run_dir: str, diff: dict[str, Any], short: dict[str, str]) -> str:
    return " ".join([Path(run_dir).name, *(f"{short[k]}={_fmt(v, k)}" for k, v in diff.items())])


def figure(groups: dict[str, list[tuple[RunInfo, dict[str, Any]]]], metric: str) -> Figure:
    """One subplot per experiment with a curve per fit run that logged ``metric``, labelled by its
    run directory and abbreviated config differences; legends sit right of their axes, colours
    from ``tab10`` (``tab20`` beyond 10 runs, then line styles) so 10+ runs stay apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        name: [(run, row) for run, row in pairs if _is_fit(row["command"]) and run.series(metric)]
        for name, pairs in groups.items()
    }
    curves = {name: pairs for name, pairs in curves.items() if pairs}
    heights = [max(2.6, 0.17 * len(pairs) + 0.8) for pairs in curves.values()]
    fig, axes = plt.subplots(
        len(curves), 1, figsize=(11, sum(heights)), squeeze=False, layout="constrained",
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    for ax, (name, pairs) in zip(axes[:, 0], curves.items(), strict=True):
        keys = sorted({k for _, row in pairs for k in row["config_diff"]})
        short = short_keys(keys)
        cmap = plt.get_cmap("tab10" if len(pairs) <= 10 else "tab20")
        for i, (run, row) in enumerate(pairs):
            series = run.series(metric)
            ax.plot(
                [s for s, _ in series],
                [v for _, v in series],
                color=cmap(i % cmap.N),
                linestyle=("-", "--", ":", "-.")[(i // cmap.N) % 4],
                marker="o" if len(series) <= 30 else None,
                markersize=3,
                label=_label(row["run_dir"], row["config_diff"], short),
            )
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
            ncols=1 if len(pairs) <= 20 else 2,
        )  # fmt: skip
    return fig


def collect(logdir: str | Path, metric: str, mode: str) -> dict[str, list[tuple[RunInfo, dict[str, Any]]]]:
    """Per experiment its runs, each with its JSON object (config differences within the experiment:
    across experiments nearly every key differs, which says nothing)."""
    runs = [read_run(d) for d in find_run_dirs(logdir)]
    out: dict[str, list[tuple[RunInfo, dict[str, Any]]]] = {}
    for name, members in group_runs(runs, logdir).items():
        diffs = config_differences([r.config for r in members])
        out[name] = [(r, summarize(r, d, metric, mode, name)) for r, d in zip(members, diffs, strict=True)]
    return out


def run(args: argparse.Namespace) -> int:
    groups = collect(args.logdir, args.metric, args.mode)
    rows = [row for pairs in groups.values() for _, row in pairs]
    if args.plot:
        if not any(
            _is_fit(row["command"]) and r.series(args.metric) for ps in groups.values() for r, row in ps
        ):
            raise JTMLError(f"no fit run logged {args.metric!r}: nothing to plot", args.logdir)
        import matplotlib.pyplot as plt

        fig = figure(groups, args.metric)
        with atomic_write(args.plot) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows, args.metric))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
