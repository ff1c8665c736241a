"""Plots and an HTML report from sequential-editing run directories.

``seqedit report RUN_DIR [RUN_DIR ...] --out reports/`` writes ``report.html`` and, under
``figures/``, PNG and SVG files, per model:

- editing metrics against the number of edits, one panel per metric, one line per method
  (the LyapLock paper's Figure 3);
- retention: the first batch's efficacy and generalization against the edits made since, and
  each tenth of the history at the last checkpoint;
- preservation loss per edited layer against the number of edits with each method's threshold
  dashed (its Figure 4);
- the queue weight q of every LyapLock variant, per layer, in one figure;
- seconds per edit batch; perplexity and the edit_glue subsets a small model scores above
  chance, against the number of edits; every other general-capability metric.

The page embeds the figures by relative path, the leaderboard tables (rendered by
:mod:`harness.runs.leaderboard`) and a summary of each run's manifest. Figures are drawn on
matplotlib's Agg canvas without pyplot, so nothing global is touched.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from harness.runs import leaderboard
from harness.runs.resultsdir import (
    EDITING_METRICS,
    PERPLEXITY,
    GeneralMetric,
    MethodRun,
    RunDir,
    RunDirError,
    _layer_order,
    combine_seeds,
    load_runs,
)
from harness.runs.sampling import RETENTION_METRICS

EDITS_AXIS = "number of edits"
SECONDS_AXIS = "seconds per batch"
PRESERVATION_AXIS = "preservation loss D_t (mean squared output change)"
Q_AXIS = "queue weight q = a·Z (dimensionless)"
LOG_SCALE_SPAN = 100.0  # a series spanning more than two decades is drawn on a log axis
# perplexity compounds: one method's tenfold rise (AlphaEdit's at 3,000 edits) would flatten the
# others' curves on a linear axis
PERPLEXITY_LOG_SPAN = 10.0
FIGURES_DIR = "figures"
PANEL_SIZE = (4.6, 3.4)  # inches per panel
MAX_COLUMNS = 3
PNG_DPI = 110
THRESHOLD_LINESTYLE = "--"
THRESHOLD_LABEL = "threshold α·D_base (dashed, the method's colour)"
RUN_LINESTYLES = ("-", "-.", ":")  # never the threshold's dashes
# deterministic SVGs: fixed ids, text as paths (renders the same without the fonts installed)
SAVE_RC = {"svg.hashsalt": "seqedit-report", "svg.fonttype": "path"}


@dataclass
class Series:
    """One method of one run: a line in every plot of its model."""

    run: MethodRun
    label: str
    color: str
    linestyle: str


@dataclass
class Plot:
    stem: str  # file name without extension, under figures/
    title: str
    caption: str
    figure: Figure
    model: str


# ---------------------------------------------------------------------------- series


# One colour per method in every figure and every report: the baselines in cool and neutral
# colours, LyapLock and its add-ons in warm ones, so the two groups read apart at a glance.
BASELINE_COLORS = {
    "memit": "#1f77b4", "alphaedit": "#2ca02c", "prune": "#8c564b", "rect": "#17becf",
    "rlsedit": "#bcbd22", "encore": "#7f7f7f", "ft": "#9467bd", "rome": "#000000",
}
LYAPLOCK_COLORS = {
    "lyaplock": "#d62728", "lyaplock-alphaedit": "#ff7f0e", "lyaplock-prune": "#e377c2",
    "lyaplock-rect": "#a6761d",
}
METHOD_COLORS = {**BASELINE_COLORS, **LYAPLOCK_COLORS}
# methods this package does not know get tab20's light shades
EXTRA_PALETTE = tuple(to_hex(c) for c in matplotlib.colormaps["tab20"].colors[1::2])
GROUP_TITLES = ("Baselines", "LyapLock and add-ons")


def is_lyaplock(method: str) -> bool:
    return method == "lyaplock" or method.startswith("lyaplock-")


def method_order(method: str) -> tuple:
    """Baselines first, then the LyapLock family, each in the package's order; others last."""
    known = list(METHOD_COLORS)
    return (is_lyaplock(method), known.index(method) if method in known else len(known), method)


def build_series(runs: list[RunDir]) -> list[Series]:
    """Colours follow the method, so a method looks the same in every figure; the line style
    tells apart runs of one method (edited with CounterFact or with ZsRE, say), and the legend
    names each method once, grouped, with one entry per line style."""
    method_runs = sorted(combine_seeds([m for run in runs for m in run.methods]), key=lambda m: method_order(m.method))
    unknown = [m for m in dict.fromkeys(m.method for m in method_runs) if m not in METHOD_COLORS]
    colors = {**METHOD_COLORS, **{m: EXTRA_PALETTE[i % len(EXTRA_PALETTE)] for i, m in enumerate(unknown)}}
    series = []
    for m in method_runs:
        same_method = [o for o in method_runs if o.model == m.model and o.method == m.method]
        label = m.method
        if len(same_method) > 1:
            # the edit data where it differs, and the run directory (a sweep cell's name, such as
            # alpha-2) where runs on the same data differ in something else
            tags = [m.edit_data] if len({o.edit_data for o in same_method}) > 1 else []
            if sum(o.edit_data == m.edit_data for o in same_method) > 1:
                tags.append(m.run_path.name)
            label += f" ({', '.join(tags)})"
        style = RUN_LINESTYLES[same_method.index(m) % len(RUN_LINESTYLES)]
        series.append(Series(m, label, colors[m.method], style))
    return series


def _split_label(label: str) -> tuple[str, str]:
    """(method, run tag) of a line label ``method (tag)``; (label, "") for any other label."""
    head, sep, tail = label.partition(" (")
    if sep and tail.endswith(")") and (head in METHOD_COLORS or is_lyaplock(head)):
        return head, tail[:-1]
    return label, ""


def _checkpoint_points(run: MethodRun, extract: Callable, key) -> tuple[list, list, list, list]:
    """``extract`` is ``MethodRun.editing_at`` or ``MethodRun.general_at``. The fourth list holds
    the checkpoints whose value is NaN/Inf: marked on the axis, never drawn as a value."""
    xs, means, errs, faults = [], [], [], []
    for edits in run.checkpoints:
        value = extract(run, edits).get(key)
        if value is None:
            continue
        if not value.finite:
            faults.append(edits)
            continue
        xs.append(edits)
        means.append(value.mean)
        errs.append(value.stderr)
    return xs, means, errs, faults


def _mark_faults(ax, faults: list, color) -> None:
    """A red cross on the x axis at each checkpoint that computed NaN/Inf."""
    if faults:
        ax.scatter(faults, [0.03] * len(faults), marker="x", s=60, color="red",
                   transform=ax.get_xaxis_transform(), zorder=5, label="NaN/Inf (fault)", clip_on=False)


# ---------------------------------------------------------------------------- figures


def _grid(n_panels: int, title: str) -> tuple[Figure, list]:
    cols = min(MAX_COLUMNS, max(n_panels, 1))
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols + 1.8, PANEL_SIZE[1] * rows + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    if cols == 1:
        # a centred title spans the legend's column too, and on one panel's width a long model
        # name runs into the legend: start it at the left edge, the model on a line of its own
        fig.suptitle(title.replace(": ", ":\n", 1), fontsize=13, x=0.02, ha="left")
    else:
        fig.suptitle(title, fontsize=13)
    return fig, axes[:n_panels]


def _finish(fig: Figure, axes: list) -> None:
    """One legend per figure, outside the panels: each method once (baselines, then the
    LyapLock family, under a heading each when both appear), then one entry per line style
    where a method has several runs, then anything else drawn (thresholds, faults)."""
    entries: dict[str, object] = {}
    styles: dict[str, str] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            name, tag = _split_label(label)
            entries.setdefault(name, handle)
            if tag:
                styles.setdefault(tag, handle.get_linestyle())
    methods = [n for n in entries if n in METHOD_COLORS or is_lyaplock(n)]
    others = [n for n in entries if n not in methods]
    groups = [[n for n in methods if not is_lyaplock(n)], [n for n in methods if is_lyaplock(n)]]
    handles, labels = [], []

    def heading(text):
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(text)

    for title, names in zip(GROUP_TITLES, groups):
        if names and all(groups):
            heading(title)
        for n in sorted(names, key=method_order):
            handles.append(Line2D([], [], color=entries[n].get_color(), linestyle="-",
                                  marker=entries[n].get_marker()))
            labels.append(n)
    if len(styles) > 1:
        heading("Runs")
        for tag, style in styles.items():
            handles.append(Line2D([], [], color="0.3", linestyle=style))
            labels.append(tag)
    for n in others:
        handles.append(entries[n])
        labels.append(n)
    if labels:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def _plot_with_band(ax, line: Series, xs: list, means: list, errs: list) -> None:
    """A line with markers, shaded ± one standard error where every point has one."""
    ax.plot(xs, means, marker="o", markersize=3, color=line.color, linestyle=line.linestyle, label=line.label)
    if all(isinstance(e, (int, float)) for e in errs):
        ax.fill_between(xs, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)],
                        color=line.color, alpha=0.15)


def _log_if_wide(ax, values: list[float], span: float = LOG_SCALE_SPAN) -> None:
    positive = [v for v in values if v > 0]
    ratio = max(positive) / min(positive) if positive else 1.0
    if ratio <= span:
        return
    ax.set_yscale("log")
    if ratio < LOG_SCALE_SPAN:
        # within two decades the default ticks label one or two powers of ten: 1-2-5 steps in
        # plain numbers let the values be read off
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def editing_figure(model: str, series: list[Series]) -> Plot | None:
    editing = MethodRun.editing_at
    specs = [
        s for s in EDITING_METRICS
        if not s.retention_of and any(any(_checkpoint_points(x.run, editing, s.key)[::3]) for x in series)
    ]
    if not specs:
        return None
    fig, axes = _grid(len(specs), f"Editing metrics vs number of edits: {model}")
    for ax, spec in zip(axes, specs):
        for line in series:
            xs, means, errs, faults = _checkpoint_points(line.run, editing, spec.key)
            _mark_faults(ax, faults, line.color)
            if xs:
                _plot_with_band(ax, line, xs, means, errs)
        ax.set(title=spec.title, xlabel=EDITS_AXIS, ylabel=spec.axis_label)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    caption = ("Mean over the edited records at each evaluated checkpoint (0 = pre-edited; where a "
               "checkpoint scored a sample, the stratified estimate from it); "
               "shaded: ± one standard error; a red cross on the axis: the run computed NaN/Inf "
               "there (see the notes).")
    caption += "".join(f" {s.title}: {s.caveat}." for s in specs if s.caveat)
    return Plot(_stem(model, "editing_metrics"), f"Editing metrics: {model}", caption, fig, model)


EDITS_SINCE_AXIS = "edits made after the records were edited"


def _first_batch_curve(run: MethodRun, metric: str) -> tuple[list[float], list[float], list]:
    """(edits since, mean, standard error) of the first batch at each checkpoint after it."""
    xs, ys, errs = [], [], []
    for edits in run.checkpoints:
        row = run.retention_at(edits).get("first_batch") or {}
        if edits and isinstance(row.get(metric), (int, float)):
            xs.append(row["edits_since"])
            ys.append(row[metric])
            errs.append(row.get(f"{metric}_stderr"))
    return xs, ys, errs


def _profile_at_end(run: MethodRun, metric: str) -> tuple[list[float], list[float], list]:
    """(edits since, mean, standard error) of each tenth of the history at the run's last
    checkpoint, oldest first."""
    last = max((e for e in run.checkpoints if e and run.retention_at(e)), default=None)
    if last is None:
        return [], [], []
    rows = [r for name, r in run.retention_at(last).items() if name.startswith("tenth_")]
    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    return [r["edits_since"] for r in rows], [r[metric] for r in rows], [r.get(f"{metric}_stderr") for r in rows]


def retention_figure(model: str, series: list[Series]) -> Plot | None:
    panels = []
    for spec in EDITING_METRICS:
        if spec.name in RETENTION_METRICS and any(
                _first_batch_curve(x.run, spec.name)[0] for x in series if x.run.dataset in (spec.dataset.name, None)):
            panels.append(spec)
    if not panels:
        return None
    fig, axes = _grid(len(panels), f"Retention of earlier edits: {model}")
    for ax, spec in zip(axes, panels):
        for line in series:
            if line.run.dataset not in (spec.dataset.name, None):
                continue
            xs, ys, errs = _first_batch_curve(line.run, spec.name)
            if xs:
                _plot_with_band(ax, line, xs, ys, errs)
            px, py, perrs = _profile_at_end(line.run, spec.name)
            if px:
                known = all(isinstance(e, (int, float)) for e in perrs)
                ax.errorbar(px, py, yerr=perrs if known else None, marker="s", markersize=3, color=line.color,
                            linestyle=":", alpha=0.8, capsize=2, elinewidth=0.8)
        ax.set(title=spec.title, xlabel=EDITS_SINCE_AXIS, ylabel=spec.axis_label)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    return Plot(_stem(model, "retention"), f"Retention: {model}",
                "How edits hold up as later edits pile on. Solid: the records of the first batch, "
                "scored at each checkpoint, against the edits made since. Dotted: at the last "
                "checkpoint, each tenth of the edit history against the edits made after it (a "
                "tenth is scored on a few dozen records: mind its error bars). Shading and bars: ± "
                "one standard error. A line that falls to the right is forgetting.", fig, model)


def _lone_point(xs) -> dict:
    """A run that has made one batch so far (a sweep cell just started) is one point: a line
    through it draws nothing, so it gets a marker."""
    return {"marker": "o", "markersize": 4} if len(xs) == 1 else {}


def preservation_figure(model: str, series: list[Series]) -> Plot | None:
    layers = list(dict.fromkeys(
        layer for s in series for layer in s.run.layer_series("preservation_loss")
    ))
    if not layers:
        return None
    fig, axes = _grid(len(layers), f"Preservation loss per layer vs number of edits: {model}")
    for ax, layer in zip(axes, layers):
        plotted, thresholds = [], []
        for line in series:
            xs, ys = line.run.layer_series("preservation_loss").get(layer, ([], []))
            if xs:
                ax.plot(xs, ys, color=line.color, linestyle=line.linestyle, label=line.label, **_lone_point(xs))
                plotted += ys
            txs, tys = line.run.layer_series("threshold").get(layer, ([], []))
            if txs:
                ax.plot(txs, tys, color=line.color, linestyle=THRESHOLD_LINESTYLE, linewidth=1.2,
                        label=THRESHOLD_LABEL, gid=f"{line.label} threshold", **_lone_point(txs))
                plotted += tys
                middle = len(txs) // 2
                thresholds.append((line, txs[middle], tys[middle]))
        if len(thresholds) > 1 and len({line.color for line, _, _ in thresholds}) == 1:
            # a sweep of one method: its runs share the colour and a dashed line has no style of
            # its own, so each threshold names its run, under its middle, where the held losses are
            # not (with several methods the colours tell them apart, and names would pile up)
            for line, x, y in thresholds:
                ax.annotate(line.label, (x, y), xytext=(0, -2), textcoords="offset points", ha="center",
                            va="top", fontsize=7, color=line.color)
        _log_if_wide(ax, plotted)
        ax.set(title=f"layer {layer}", xlabel=EDITS_AXIS)
        ax.set_ylabel(PRESERVATION_AXIS, fontsize=8)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    return Plot(_stem(model, "preservation_loss"), f"Preservation loss: {model}",
                "Mean squared change of each edited layer's output on generic text relative to "
                "the original model, after each batch; dashed: the LyapLock threshold α·D_base. "
                "Look for the lines that cross it and for LyapLock staying near it once its queue acts. "
                + crossing_summary(series), fig, model)


def crossing_summary(series: list[Series]) -> str:
    """When each method's preservation loss first passed a LyapLock threshold of the same layer (the
    first LyapLock run's, for methods without a threshold of their own), in one sentence."""
    reference = next((s.run.layer_series("threshold") for s in series if s.run.layer_series("threshold")), {})
    if not reference:
        return ""
    parts = []
    for line in series:
        own = line.run.layer_series("threshold")
        thresholds = own or reference
        first = None
        for layer, (xs, ys) in line.run.layer_series("preservation_loss").items():
            limit = dict(zip(*thresholds.get(layer, ([], []))))
            if not own and limit:  # a fixed threshold: the reference run's first one
                limit = dict.fromkeys(xs, next(iter(limit.values())))
            above = [x for x, y in zip(xs, ys) if limit.get(x) and y > limit[x]]
            if above and (first is None or above[0] < first[0]):
                first = (above[0], layer)
        parts.append(f"{line.label} first passes it after {first[0]} edits (layer {first[1]})" if first
                     else f"{line.label} stays below it")
    return "; ".join(parts) + "."


def queue_figure(model: str, series: list[Series]) -> Plot | None:
    """The queue weight q of every LyapLock variant, one panel per layer: which variants' queues
    acted, when, and on which layers."""
    variants = [s for s in series if s.run.layer_series("q")]
    if not variants:
        return None
    layers = list(dict.fromkeys(layer for s in variants for layer in s.run.layer_series("q")))
    layers.sort(key=_layer_order)
    fig, axes = _grid(len(layers), f"LyapLock queue weight q per layer: {model}")
    for ax, layer in zip(axes, layers):
        for line in variants:
            xs, ys = line.run.layer_series("q").get(layer, ([], []))
            if xs:
                ax.plot(xs, ys, color=line.color, linestyle=line.linestyle, label=line.label, **_lone_point(xs))
        ax.set(title=f"layer {layer}", xlabel=EDITS_AXIS)
        ax.set_ylabel(Q_AXIS, fontsize=8)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    summaries = " ".join(f"{line.label}: {queue_summary(line.run)}" for line in variants)
    return Plot(_stem(model, "lyaplock_queue"), f"LyapLock queues: {model}",
                "The virtual queue Z grows while a layer's preservation loss exceeds its threshold; "
                "q = a·Z (never below 1) weights the pull back to the original model in the next "
                "batch, so a flat line at 1 is a queue that never acted. " + summaries, fig, model)


def restraint_figure(line: Series) -> Plot | None:
    """PRUNE (and LyapLock base=prune): per layer, the accumulated update's largest singular
    value against the bound sigma_max(W0) above which the restraint compresses it."""
    tops = line.run.layer_series("update_sigma_max")
    if not tops:
        return None
    # the restraint wraps the editor that makes the edits: MEMIT's for PRUNE, LyapLock's for its add-on
    raw = "LyapLock" if is_lyaplock(line.run.method) else "MEMIT"
    bounds = line.run.layer_series("sigma_max_W0")
    model = line.run.model
    fig, axes = _grid(len(tops), f"PRUNE restraint: {line.label} on {model}")
    first_acts = []
    for ax, (layer, (xs, ys)) in zip(axes, tops.items()):
        ax.plot(xs, ys, color=line.color, label="largest singular value of W - W0 (raw)")
        bxs, bys = bounds.get(layer, ([], []))
        if bxs:
            ax.plot(bxs, bys, color="black", linestyle=THRESHOLD_LINESTYLE, linewidth=1.2, label="bound σ_max(W0)")
            above = [x for x, y, b in zip(xs, ys, bys) if y > b]
            if above:
                first_acts.append((above[0], layer))
        ax.set(title=f"layer {layer}", xlabel=EDITS_AXIS)
        ax.set_ylabel("singular value", fontsize=8)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    if first_acts:
        edits, layer = min(first_acts, key=lambda t: (t[0], _layer_order(t[1])))
        acted = (f"The restraint first acted after {edits} edits (layer {layer}); "
                 f"{len(first_acts)} of {len(tops)} layers passed the bound.")
    else:
        acted = f"No layer's accumulated update passed the bound: the model stayed raw {raw}."
    # a lone plain PRUNE run needs no name; an add-on or a tagged run does ("... in lyaplock-prune")
    where = "" if line.label == "prune" else f" in {line.label}"
    return Plot(_stem(model, line.label, "restraint"), f"PRUNE restraint{where}: {model}",
                f"The edits accumulate as plain {raw}; the model shows the update with every singular "
                "value above σ_max(W0) (dashed) compressed logarithmically. " + acted, fig, model)


def queue_summary(run: MethodRun) -> str:
    """What the queue did in this run, in one sentence: a flat plot should not need decoding."""
    losses, thresholds = run.layer_series("preservation_loss"), run.layer_series("threshold")
    ratios = []
    for layer, (xs, ys) in losses.items():
        limit_at = dict(zip(*thresholds.get(layer, ([], []))))
        ratios += [(loss / limit_at[x], x, layer) for x, loss in zip(xs, ys) if limit_at.get(x)]
    queue_weights = run.layer_series("q")
    raised = [
        (x, layer) for layer, (xs, ys) in queue_weights.items() for x, q in zip(xs, ys) if q > 1.0
    ]
    parts = []
    if ratios:
        ratio, edits, layer = max(ratios)
        parts.append(f"Highest preservation loss: {ratio:.2f} × the threshold (layer {layer}, "
                     f"{edits} edits).")
    if raised:
        edits, layer = min(raised, key=lambda r: r[0])
        parts.append(f"q first rose above 1 after {edits} edits (layer {layer}).")
    elif queue_weights:
        parts.append("q stayed at 1 throughout: no layer's loss passed its threshold.")
    return " ".join(parts)


def edit_time_figure(model: str, series: list[Series]) -> Plot | None:
    lines = [(s, s.run.batch_series("edit_seconds")) for s in series]
    lines = [(s, xy) for s, xy in lines if xy[0]]
    if not lines:
        return None
    fig, axes = _grid(1, f"Edit time per batch: {model}")
    ax = axes[0]
    for line, (xs, ys) in lines:
        ax.plot(xs, ys, color=line.color, linestyle=line.linestyle, marker=".", markersize=3,
                label=line.label)
    ax.set(title="seconds per edit batch", xlabel=EDITS_AXIS, ylabel=SECONDS_AXIS)
    ax.grid(alpha=0.3)
    _finish(fig, axes)
    return Plot(_stem(model, "edit_seconds"), f"Edit time: {model}",
                "Wall-clock seconds spent computing and applying each batch of edits "
                "(evaluation excluded).", fig, model)


GLUE_SUBSET_PREFIX = "edit_glue_"
LIKELIHOOD_ACCURACY = "acc_likelihood,none"
ABOVE_CHANCE_Z = 2.0  # a subset counts as above chance when the pre-edited model is 2 stderr over it


def glue_subsets(series: list[Series]) -> list[str]:
    return sorted({t for s in series for c in s.run.checkpoints.values() for t in c.task_metrics()
                   if t.startswith(GLUE_SUBSET_PREFIX) and c.measurement(t, LIKELIHOOD_ACCURACY)})


def chance_finding(series: list[Series], task: str) -> tuple[float | None, float | None]:
    """(chance level, z of the pre-edited model's likelihood accuracy over it)."""
    for s in series:
        checkpoint = s.run.checkpoints.get(0)
        value = checkpoint.measurement(task, LIKELIHOOD_ACCURACY) if checkpoint else None
        chance = checkpoint.chance_level(task) if checkpoint else None
        if value is not None and chance is not None and value.stderr:
            return chance, (value.mean - chance) / value.stderr
    return None, None


def _task_points(run: MethodRun, task: str, key: str) -> tuple[list, list, list]:
    xs, means, errs = [], [], []
    for edits, checkpoint in run.checkpoints.items():
        value = checkpoint.measurement(task, key)
        if value is not None and value.finite:
            xs.append(edits)
            means.append(value.mean)
            errs.append(value.stderr)
    return xs, means, errs


def capability_panels(series: list[Series]) -> tuple[list[tuple], list[str]]:
    """((task, metric key, y label, chance level or None) per panel, the subsets left at chance)."""
    panels, at_chance = [], []
    if any(_task_points(s.run, *PERPLEXITY)[0] for s in series):
        panels.append((PERPLEXITY[0], PERPLEXITY[1], "word perplexity (lower is better)", None))
    for task in glue_subsets(series):
        chance, z = chance_finding(series, task)
        name = task[len(GLUE_SUBSET_PREFIX):]
        if z is not None and z >= ABOVE_CHANCE_Z:
            panels.append((task, LIKELIHOOD_ACCURACY, f"{name} accuracy (likelihood)", chance))
        else:
            at_chance.append(name if z is None else f"{name} (z = {z:.1f})")
    return panels, at_chance


def capability_figure(model: str, series: list[Series]) -> Plot | None:
    """Perplexity of held-out text, and the edit_glue subsets on which the unedited model is
    measurably above chance by likelihood: the general ability a small model can show."""
    panels, at_chance = capability_panels(series)
    if not panels:
        return None
    fig, axes = _grid(len(panels), f"General capability a small model shows: {model}")
    for ax, (task, key, ylabel, chance) in zip(axes, panels):
        plotted = []
        for line in series:
            xs, means, errs = _task_points(line.run, task, key)
            if xs:
                _plot_with_band(ax, line, xs, means, errs)
                plotted += means
        if (task, key) == PERPLEXITY:
            _log_if_wide(ax, plotted, PERPLEXITY_LOG_SPAN)
        if chance is not None:
            ax.axhline(chance, color="0.4", linestyle=":", linewidth=1, label=f"chance ({chance:g})")
        ax.set(title=task, xlabel=EDITS_AXIS, ylabel=ylabel)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    caption = ("Perplexity of held-out WikiText-2 articles, and each edit_glue subset on which the "
               f"pre-edited model's likelihood accuracy is at least {ABOVE_CHANCE_Z:g} standard errors "
               "above chance (dotted). A rising perplexity or a fall towards chance is lost ability.")
    if axes[0].get_yscale() == "log":
        caption += (f" Perplexity is drawn on a log axis: it spans more than {PERPLEXITY_LOG_SPAN:g}-fold "
                    "across the runs.")
    if at_chance:
        caption += " At chance before editing, so not drawn: " + ", ".join(at_chance) + "."
    return Plot(_stem(model, "capability"), f"General capability: {model}", caption, fig, model)


def general_figure(model: str, series: list[Series]) -> Plot | None:
    """Every other general-capability metric (the ones the capability figure draws are left out)."""
    general = MethodRun.general_at
    drawn = {PERPLEXITY[0], "edit_glue", *glue_subsets(series)} if capability_panels(series)[0] else set()
    metrics: list[GeneralMetric] = list(dict.fromkeys(
        key for s in series for edits in s.run.checkpoints for key in general(s.run, edits) if key.task not in drawn
    ))
    if not metrics:
        return None
    metrics.sort(key=lambda g: g.task)
    fig, axes = _grid(len(metrics), f"General capability vs number of edits: {model}")
    for ax, metric in zip(axes, metrics):
        for line in series:
            xs, means, errs, faults = _checkpoint_points(line.run, general, metric)
            _mark_faults(ax, faults, line.color)
            if xs:
                _plot_with_band(ax, line, xs, means, errs)
        ax.set(title=metric.task, xlabel=EDITS_AXIS, ylabel=metric.label)
        ax.grid(alpha=0.3)
    _finish(fig, axes)
    # math and code on a small model are a handful of solved problems: a step of one problem
    # must not read as lost ability, hence the band and the sentence
    return Plot(_stem(model, "general_capability"), f"General capability: {model}",
                "lm-eval metrics of the general-capability tasks at each checkpoint "
                "(0 = pre-edited); shaded: ± one standard error where lm-eval gives one. "
                "A change inside the shading is one or two problems, not lost ability; "
                "look for a fall that leaves it.", fig, model)


def build_plots(runs: list[RunDir]) -> list[Plot]:
    series = build_series(runs)
    plots = []
    for model in dict.fromkeys(s.run.model for s in series):
        of_model = [s for s in series if s.run.model == model]
        plots += [
            editing_figure(model, of_model),
            retention_figure(model, of_model),
            preservation_figure(model, of_model),
            queue_figure(model, of_model),
            *(restraint_figure(s) for s in of_model),
            edit_time_figure(model, of_model),
            capability_figure(model, of_model),
            general_figure(model, of_model),
        ]
    return [p for p in plots if p is not None]


def save_plot(plot: Plot, figures_dir: Path) -> None:
    figures_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(SAVE_RC):
        plot.figure.savefig(figures_dir / f"{plot.stem}.png", dpi=PNG_DPI)
        # the first save laid the panels out; keep those positions rather than solving again
        plot.figure.set_layout_engine("none")
        plot.figure.savefig(figures_dir / f"{plot.stem}.svg", metadata={"Date": None})


def _stem(*parts: str) -> str:
    """A file name from a model name, a line label and the figure kind."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-").lower() for p in parts)


# ---------------------------------------------------------------------------- page


MANIFEST_COLUMNS = ("Run", "Model", "Methods", "Edit data", "Edits", "Batch size",
                    "Eval every", "Seed", "Git commit", "Versions", "Hardware", "Started")


def manifest_row(run: RunDir) -> list[str]:
    config, manifest = run.config, run.manifest
    missing = leaderboard.MISSING

    def text(value) -> str:
        if value is None or value == "":
            return missing
        if isinstance(value, dict):
            return "; ".join(f"{k} {text(v)}" for k, v in value.items()) or missing
        if isinstance(value, (list, tuple)):
            return ", ".join(text(v) for v in value) or missing
        return str(value)

    return [
        str(run.path),
        f"{run.model} ({config['model']})" if config.get("model") else run.model,
        text(config.get("methods") or [m.method for m in run.methods]),
        text(config.get("edit_data")),
        text(config.get("num_edits")),
        text(config.get("edit_batch_size")),
        text(config.get("eval_every")),
        text(config.get("seed")),
        text(manifest.get("git_commit"))[:12],
        text(manifest.get("versions")),
        text(manifest.get("hardware")),
        text(manifest.get("started")),
    ]


def manifests_html(runs: list[RunDir]) -> str:
    e = html.escape
    head = "".join(f'<th scope="col">{e(c)}</th>' for c in MANIFEST_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(v)}</td>" for v in manifest_row(run)) + "</tr>"
        for run in runs
    )
    return (f'<section id="runs"><h2>Runs</h2><div class="scroll"><table><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div></section>")


def figures_html(plots: list[Plot]) -> str:
    e = html.escape
    parts = ['<section id="figures">']
    for model in dict.fromkeys(p.model for p in plots):
        parts.append(f"<h2>Figures: {e(model)}</h2>")
        for p in (p for p in plots if p.model == model):
            png, svg = f"{FIGURES_DIR}/{p.stem}.png", f"{FIGURES_DIR}/{p.stem}.svg"
            parts.append(
                f'<figure id="{e(p.stem)}"><img src="{e(png)}" alt="{e(p.title)}">'
                f"<figcaption><strong>{e(p.title)}.</strong> {e(p.caption)} "
                f'<a href="{e(svg)}">SVG</a></figcaption></figure>'
            )
    parts.append("</section>")
    return "\n".join(parts)


def report_html(runs: list[RunDir], plots: list[Plot], edits: int | None) -> str:
    try:
        board = leaderboard.build_leaderboard(runs, edits)
    except RunDirError as err:
        board = None
        tables = f'<h2>Leaderboard</h2><ul class="notes"><li>{html.escape(str(err))}</li></ul>'
    if board is not None:
        tables = "\n".join(leaderboard.table_to_html(t) for t in board.tables)
    notes = board.notes if board is not None else [n for r in runs for n in r.notes]
    body = "\n".join([
        manifests_html(runs), tables, figures_html(plots), leaderboard.notes_html(notes),
    ])
    return leaderboard.html_page("Sequential editing report", body)


def write_report(runs: list[RunDir], out: Path, edits: int | None = None) -> tuple[Path, list[Plot]]:
    plots = build_plots(runs)
    for plot in plots:
        save_plot(plot, out / FIGURES_DIR)
    # figures an earlier report wrote here and this one does not draw would sit beside the page,
    # stale: they go
    drawn = {p.stem for p in plots}
    for old in (out / FIGURES_DIR).glob("*"):
        if old.suffix in (".png", ".svg") and old.stem not in drawn:
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(report_html(runs, plots, edits), encoding="utf-8")
    return page, plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seqedit report",
        description="Plots (PNG, SVG) and an HTML report from sequential-editing runs.",
    )
    leaderboard.add_run_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="output directory (default: reports/)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except RunDirError as err:
        print(f"seqedit report: error: {err}", file=sys.stderr)
        return 2
    page, plots = write_report(runs, args.out, args.edits)
    print(f"wrote {page} and {len(plots)} figures (PNG + SVG) under {args.out / FIGURES_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
