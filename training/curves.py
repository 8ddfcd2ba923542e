"""Training curves from metrics files (JSON lines, one record per logged step), several runs overlaid.

    plot_metrics(["RUN/metrics.jsonl", "OTHER/metrics.jsonl"], "curves.png")   # MetricsError for a bad file

Six panels: training and validation loss, learning rate, gradient norm, tokens/s, MFU and peak GPU memory, each run
in its own colour under its name (the folder holding a `metrics.jsonl`, else the file name). A panel without data
says so. The picture is always 1500 x 900 pixels. No display is needed (matplotlib's Agg canvas, imported lazily),
so the trainer can call plot_metrics() at every checkpoint; `tools/plot_metrics.py` is its command line.
"""

from __future__ import annotations

import json
import os

WIDTH_IN, HEIGHT_IN, DPI = 15, 9, 100

# (title, [(metric key, line style)], y transform, draw only the first key a run has). A list value (one per rank)
# is plotted as its maximum; the memory panel takes the per-rank figure and falls back to the logging rank's own.
PANELS = (
    ("loss", [("loss", "-"), ("valid.loss", "--")], None, False),
    ("learning rate", [("lr", "-")], None, False),
    ("gradient norm", [("grad_norm", "-")], None, False),
    ("tokens/s", [("tokens_per_s", "-")], None, False),
    ("MFU %", [("mfu", "-")], lambda v: 100 * v, False),
    ("peak memory GB (busiest rank)", [("mem_gb_per_rank", "-"), ("mem_gb", "-")], None, True),
)


class MetricsError(ValueError):
    """A metrics file that cannot be drawn; the message names the file (and line) and the fix."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN: no point


def read_metrics(path: str) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of one file; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    try:
        with open(path) as f:
            lines = list(f)
    except OSError as e:
        raise MetricsError(f"{path}: cannot read ({e.strerror}); give a metrics .jsonl file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # a run killed mid-write leaves half a last line: draw the rest
                continue
            raise MetricsError(f"{path}:{number}: not a JSON object with a 'step'; is this a metrics file?") from None
        for key, value in record.items():
            if isinstance(value, list):
                value = max((v for v in value if _is_number(v)), default=None)
            if _is_number(value):
                series.setdefault(key, {})[step] = float(value)
    if not series:
        raise MetricsError(f'{path}: no metrics in it (expected JSON lines such as {{"step": 1, "loss": 2.5}})')
    return series


def run_names(paths: list[str]) -> list[str]:
    """A short name per file: its folder for `metrics.jsonl` (the run's checkpoint folder), else the file stem."""
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        names.append(folder if stem == "metrics" and folder else stem)
    if len(set(names)) < len(names):  # two runs with the same name: tell them apart by path
        names = [os.path.relpath(p) for p in paths]
    return names


def plot_metrics(paths: list[str], output: str) -> None:
    """Draw the runs' curves into the PNG `output` (written to a temporary name first, then renamed: a viewer or
    a crash never sees half a picture). Raises MetricsError for a file that cannot be read."""
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot: no display and no global state

    runs = [(name, read_metrics(path)) for name, path in zip(run_names(paths), paths)]
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys, transform, first_only) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn = False
        for (name, series), colour in zip(runs, colours):
            for key, style in keys:
                points = sorted(series.get(key, {}).items())
                if not points:
                    continue
                steps, values = zip(*points)
                if transform:
                    values = [transform(v) for v in values]
                label = name if len(keys) == 1 or first_only else f"{name} {key}"
                ax.plot(steps, values, style, color=colour, label=label, marker="o" if len(points) == 1 else None)
                drawn = True
                if first_only:
                    break
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial.png"
    fig.savefig(partial, dpi=DPI)
    os.replace(partial, output)
