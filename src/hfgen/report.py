"""Compare runs on one self-contained HTML page: `hfgen report RUN_DIR [RUN_DIR ...] --out report.html`.

    hfgen report outputs/tiny/sft outputs/tiny/ppo --out report.html

The page holds, for the runs side by side: the recipe keys whose values differ between them, training curves
from each run's metrics.jsonl (every numeric metric logged at two or more steps, one line per run, grouped:
loss, reward/oracle scores, KL, entropy, perplexity, optimisation, speed, other), their eval.json figures in one
table, sample texts (samples.jsonl, else eval_samples.jsonl) and images (grid.png, samples/*.png). Plots and
images are embedded as base64 PNGs, so the file can be mailed or archived alone. A run that lacks a file is
shown without it, as is one whose file is malformed (with a warning naming it); a RUN_DIR that does not exist is an
error.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hfgen import tracking
from hfgen.errors import UserError

# Metric groups, first match wins; each becomes one figure with a panel per metric.
METRIC_GROUPS = (
    ("Loss", re.compile(r"loss")),
    ("Reward and scores", re.compile(r"reward|oracle|score|win_rate")),
    ("KL divergence", re.compile(r"(^|[/_]|approx)kl([/_]|$)")),
    ("Entropy", re.compile(r"entropy")),
    ("Perplexity", re.compile(r"perplexity")),
    ("Optimisation", re.compile(r"learning_rate|(^|[/_])lr$|grad_norm|clip|(^|[/_])ratio")),
    ("Speed and time", re.compile(r"^speed/|^time/|per_s(econd)?$|runtime")),
    ("Other", re.compile(r"")),
)
NOT_CURVES = {"step", "epoch"}
EVAL_ORDER = ("quality/", "diversity/", "speed/")
IMAGES_SHOWN = 8
UNSET = "(default)"  # a recipe key a run does not set


@dataclass
class Run:
    """Everything a report shows about one run directory (empty where the run lacks the file)."""

    name: str
    path: Path
    recipe: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    complete: bool = False
    warnings: list[str] = field(default_factory=list)  # its files that could not be read, shown without them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument("run_dirs", nargs="+", type=expand_home, metavar="RUN_DIR", help="run directories to compare")
    parser.add_argument(
        "--out", type=expand_home, default="report.html", help="the HTML file to write (default: report.html)"
    )
    parser.add_argument("--title", default="hfgen report")
    parser.add_argument("--max_samples", type=int, default=8, help="sample rows shown per run")


def main(args: argparse.Namespace) -> int:
    if args.max_samples < 0:
        raise UserError(f"hfgen report: --max_samples must be >= 0 (0: no samples), got {args.max_samples}.")
    path = write_report(args.run_dirs, args.out, title=args.title, max_samples=args.max_samples)
    print(path)
    return 0


def write_report(run_dirs, out: str | Path, title: str = "hfgen report", max_samples: int = 8) -> Path:
    """Read the runs and write the HTML page; used by `hfgen report` and `hfgen sweep`."""
    missing = [str(d) for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise UserError(f"hfgen report: run dir(s) not found: {', '.join(missing)}.")
    if problem := tracking.path_problem(out, "--out", directory=False):
        raise UserError(f"hfgen report: {problem}.")
    paths = [Path(d) for d in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, run_names(paths))]
    for warning in (warning for run in runs for warning in run.warnings):
        print(f"hfgen report: warning: {warning}", file=sys.stderr)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tracking.write_text(out, render_html(runs, title, max_samples))  # a page killed half-way is never left
    return out


# ---- reading runs -----------------------------------------------------------------------------------


def run_names(paths: list[Path]) -> list[str]:
    """Directory names, with as many parent folders as it takes to tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_run(path: Path, name: str) -> Run:
    """A run's files; one that is malformed (not YAML/JSON, not UTF-8, not the mapping or rows it should hold) is
    left out with a warning naming it, as a missing one is: the other runs and files are still worth a report."""
    import yaml

    def recipe(file: Path):
        return (yaml.safe_load(file.read_text(encoding="utf-8")) or {}) if file.is_file() else {}

    run = Run(name=name, path=path, complete=tracking.is_complete(path))
    run.recipe = read_or_warn(run, "recipe.yaml", recipe, dict)
    run.metrics = read_or_warn(run, "metrics.jsonl", tracking.read_jsonl, list)
    run.eval = read_or_warn(run, "eval.json", lambda file: tracking.read_json(file, {}), dict)
    for samples_file in ("samples.jsonl", "eval_samples.jsonl"):
        if (path / samples_file).is_file():
            run.samples = read_or_warn(run, samples_file, tracking.read_jsonl, list)
            break
    grid = [path / "grid.png"] if (path / "grid.png").is_file() else []
    run.images = grid + sorted((path / "samples").glob("*.png"))[:IMAGES_SHOWN]
    return run


def read_or_warn(run: Run, name: str, read, kind: type):
    """`read(RUN/name)` when it is a `kind` (a list: of JSON objects); else an empty one, and a warning for the run."""
    import yaml

    try:
        value = read(run.path / name)
    except (UserError, UnicodeDecodeError, yaml.YAMLError) as error:
        problem = " ".join(str(error).split())  # YAML's is several lines
        problem = problem if str(run.path / name) in problem else f"'{run.path / name}' cannot be read ({problem})"
    else:
        if kind is list and all(isinstance(row, dict) for row in value) or kind is dict and isinstance(value, dict):
            return value
        wanted = "rows that are JSON objects" if kind is list else "a mapping"
        problem = f"'{run.path / name}' does not hold {wanted}"
    run.warnings.append(f"{problem}; the run is shown without {name}")
    return kind()


# The largest magnitude a curve's point may have: beyond it, matplotlib cannot place the axis's ticks (1e308 and
# -1e308 in one panel span more than a float holds: a ValueError), nor a float hold an integer past 1.8e308
PLOTTABLE = 1e300


def numeric_series(run: Run, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metric in a run's metrics.jsonl, skipping rows without it; a null (a non-finite figure,
    as hfgen writes one: a skipped step's loss) or a value past `PLOTTABLE` is a gap in the line, as NaN and inf
    were in the records of older runs."""
    points = [
        (row.get("step", i), math.nan if row[key] is None else row[key])
        for i, row in enumerate(run.metrics)
        if key in row and (row[key] is None or is_number(row[key]))
    ]
    return [p[0] for p in points], [p[1] if -PLOTTABLE <= p[1] <= PLOTTABLE else math.nan for p in points]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_groups(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(group title, metric keys) for every metric logged as a number (not null) at two or more steps in some run."""
    keys: list[str] = []
    for run in runs:
        for row in run.metrics:
            keys += [k for k in row if k not in keys and k not in NOT_CURVES]
    curves = [k for k in keys if any(sum(map(is_number, (row.get(k) for row in run.metrics))) >= 2 for run in runs)]
    groups: dict[str, list[str]] = {}
    for key in curves:
        title = next(title for title, pattern in METRIC_GROUPS if pattern.search(key.lower()))
        groups.setdefault(title, []).append(key)
    return [(title, groups[title]) for title, _ in METRIC_GROUPS if title in groups]


# ---- plots --------------------------------------------------------------------------------------------


def curve_figure(runs: list[Run], keys: list[str], title: str):
    """One panel per metric, one line per run (labelled with the run's name)."""
    from matplotlib.figure import Figure

    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for axis, key in zip(axes, keys):
        lines = []
        for index, run in enumerate(runs):
            steps, values = numeric_series(run, key)
            if steps:  # colour by run, so a run keeps its colour in every panel
                lines += axis.plot(
                    steps, values, label=run.name, color=f"C{index % 10}", marker="." if len(steps) < 30 else None
                )
        # Names and keys as written: matplotlib reads `$...$` as TeX (an unbalanced one raised), and a legend it
        # builds itself leaves out the lines whose label starts with `_` (a run dir named `_lr1e-3`)
        axis.set_title(key, fontsize=10, parse_math=False)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        for text in axis.legend(handles=lines, fontsize=8).get_texts():
            text.set_parse_math(False)
    for axis in axes[len(keys) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    return figure


def png_base64(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode()


# ---- tables -------------------------------------------------------------------------------------------


def recipe_differences(runs: list[Run]) -> list[tuple[str, list]]:
    """(key, value per run) for the recipe keys whose values are not the same in every run."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.recipe if k not in keys]
    rows = [(k, [run.recipe.get(k, UNSET) for run in runs]) for k in keys]
    return [(k, values) for k, values in rows if len({json.dumps(v, default=str) for v in values}) > 1]


def eval_keys(runs: list[Run]) -> list[str]:
    """Every eval.json key: quality, diversity, speed first, then the stages' own, then settings (`hfgen eval`'s
    eval/..., the held-out comparison's heldout/...)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.eval if k not in keys]

    def rank(key: str) -> int:
        for i, prefix in enumerate(EVAL_ORDER):
            if key.startswith(prefix):
                return i
        return len(EVAL_ORDER) + (1 if key.startswith(("eval/", "heldout/")) else 0)

    return sorted(keys, key=rank)  # stable: keeps first-seen order within a rank


def cell(value) -> str:
    """A value as escaped HTML: chat messages as 'role: content' lines, lists one item per line."""
    from hfgen.evaluation.command import format_value

    if isinstance(value, list):
        return "<br>".join(
            cell(f"{v['role']}: {v['content']}" if isinstance(v, dict) and "content" in v else v) for v in value
        )
    if isinstance(value, dict):
        return html.escape(json.dumps(value))
    return html.escape(format_value(value))


def table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---- page ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0; }
img.sample { max-width: 45%; margin: 0.3em; border: 1px solid #ddd; }
.note { color: #777; }
"""


def render_html(runs: list[Run], title: str, max_samples: int = 8) -> str:
    names = [run.name for run in runs]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        table(
            ["run", "directory", "stage", "status"],
            [
                [
                    html.escape(r.name),
                    html.escape(str(r.path)),
                    cell(r.recipe.get("stage")),
                    "complete" if r.complete else "unfinished",
                ]
                for r in runs
            ],  # fmt: skip
            "runs",
        )
    )

    warnings = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    if warnings:
        parts.append(f'<p class="note">Unreadable files: {html.escape("; ".join(warnings))}.</p>')

    differences = recipe_differences(runs)
    if differences and len(runs) > 1:
        parts.append("<h2>Recipe differences</h2>")
        parts.append(table(["key", *names], [[html.escape(k), *map(cell, v)] for k, v in differences], "recipe"))

    parts.append("<h2>Training curves</h2>")
    groups = metric_groups(runs)
    for group_title, keys in groups:
        image = png_base64(curve_figure(runs, keys, group_title))
        parts.append(f'<img class="plot" alt="{html.escape(group_title)}" src="data:image/png;base64,{image}">')
    if not groups:
        parts.append('<p class="note">No run has a metrics.jsonl with a metric logged at two or more steps.</p>')

    parts.append("<h2>Evaluation</h2>")
    keys = eval_keys(runs)
    if keys:
        rows = [[html.escape(k), *(cell(r.eval[k]) if k in r.eval else "—" for r in runs)] for k in keys]
        parts.append(table(["metric", *names], rows, "eval"))
    else:
        parts.append('<p class="note">No run has an eval.json (run `hfgen eval RUN_DIR`).</p>')

    alerted = [r for r in runs if r.eval.get("monitor/alerts") or r.eval.get("stopped_early")]
    if alerted:  # the reward-hacking monitor's alerts (hfgen.rl.monitor), one row each
        parts.append("<h2>Reward-hacking alerts</h2>")
        rows = [[html.escape(r.name), cell(a["step"]), cell(a["onset"]), cell(a["signal"]), cell(a["message"])]
                for r in alerted for a in r.eval.get("monitor/alerts", [])]  # fmt: skip
        rows += [[html.escape(r.name), cell(r.eval["stopped_at_step"]), "", "stopped early", cell(r.eval["stop_reason"])]
                 for r in alerted if r.eval.get("stopped_early")]  # fmt: skip
        parts.append(table(["run", "step", "since step", "signal", "what it saw"], rows, "alerts"))

    parts.append("<h2>Samples</h2>")
    for run in runs:
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        if run.samples:
            shown = run.samples[:max_samples]
            columns = list(dict.fromkeys(k for row in shown for k in row))
            parts.append(table(columns, [[cell(row.get(k)) for k in columns] for row in shown], "samples"))
        if run.images:
            parts += [
                f'<img class="sample" alt="{html.escape(p.name)}" src="data:image/png;base64,'
                f'{base64.b64encode(p.read_bytes()).decode()}">'
                for p in run.images
            ]
        if not run.samples and not run.images:
            parts.append('<p class="note">No samples.</p>')

    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
