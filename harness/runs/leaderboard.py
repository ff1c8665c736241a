"""Leaderboard tables from sequential-editing run directories.

``seqedit leaderboard RUN_DIR [RUN_DIR ...] --at N --out leaderboards/`` writes, at one
number of edits (``--edits`` is the same option):

- the editing table in the layout of the LyapLock paper's Table 1 (rows method x model,
  CounterFact Eff./Gen./Spe./Flu./Consis. and ZsRE Eff./Gen./Spe., "mean ± stderr", a
  Pre-edited row per model from the ``edits_000000`` checkpoint);
- the trajectory table: the editing metrics at earlier numbers of edits (``--trajectory``,
  default 1,000 and 3,000, where runs have them), side by side;
- the general-capability table (each task's metrics, with the relative change from the
  pre-edited model);

as Markdown, CSV (one per table) and one standalone HTML page. The best value of each column
within a model's block is marked; the pre-edited row never competes. Runs holding different
editing datasets of the same method and model (a CounterFact run and a ZsRE run) merge into one
row; general capability depends on what was edited, so its rows also name the edit data.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.runs.resultsdir import (
    EDITING_METRIC_BY_KEY,
    EDITING_METRICS,
    GeneralMetric,
    Measurement,
    MethodRun,
    RunDir,
    RunDirError,
    combine_seeds,
    load_runs,
)

PRE_EDITED = "Pre-edited"
MISSING = "—"  # an unavailable metric is shown as unavailable, never as zero
NOT_A_NUMBER = "NaN"  # a metric the run computed as NaN/Inf: shown, never ranked
EDITING_DECIMALS = 2
GENERAL_DECIMALS = 3


@dataclass(frozen=True)
class Column:
    key: object  # EditingMetric.key or GeneralMetric
    group: str  # spanning header: the dataset or the task
    label: str
    higher_is_better: bool = True
    decimals: int = EDITING_DECIMALS

    @property
    def title(self) -> str:
        arrow = "" if self.higher_is_better else " ↓"
        return f"{self.group} {self.label}{arrow}"


@dataclass
class Row:
    model: str
    labels: tuple[str, ...]  # one value per Table.key_headers
    edits: int
    reference: bool = False  # the pre-edited row
    values: dict = field(default_factory=dict)  # column key -> Measurement
    change: dict = field(default_factory=dict)  # column key -> % change from the pre-edited row
    best: set = field(default_factory=set)  # column keys where this row is best


@dataclass
class Table:
    name: str  # file-name suffix
    title: str
    description: str
    key_headers: tuple[str, ...]
    columns: list[Column]
    rows: list[Row]
    show_stderr: bool
    show_change: bool
    definitions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Leaderboard:
    edits: int
    tables: list[Table]
    runs: list[RunDir]
    notes: list[str]


# ---------------------------------------------------------------------------- building


# the trajectory table's points by default: where the long runs part ways
TRAJECTORY_POINTS = (1000, 3000)
TRAJECTORY_METRICS = ("efficacy", "generalization", "specificity", "fluency")


def build_leaderboard(runs: list[RunDir], edits: int | None = None,
                      trajectory: Iterable[int] = TRAJECTORY_POINTS) -> Leaderboard:
    method_runs = combine_seeds([m for run in runs for m in run.methods])
    if not method_runs:
        raise RunDirError(
            "the run directories hold no method results yet: "
            + ", ".join(str(r.path) for r in runs)
        )
    if edits is None:
        edits = default_edits(method_runs)
    notes = [note for run in runs for note in run.notes]
    notes += [f"{m.method} on {m.model}: the mean over seeds {', '.join(map(str, m.seeds))}, ± the standard error "
              "across them" for m in method_runs if m.seeds]
    for m in method_runs:
        if edits not in m.checkpoints:
            notes.append(
                f"{m.run_path.name}/{m.method}: no evaluated checkpoint at {edits} edits "
                f"(has {_edits_list(m)}); where nothing else fills its row, the row is left out"
            )
        if 0 not in m.checkpoints:
            notes.append(f"{m.run_path.name}/{m.method}: no pre-edited checkpoint (edits_000000)")
    notes += unavailable_notes(method_runs, edits)
    notes += non_finite_notes(method_runs)
    tables = [
        editing_table(method_runs, edits, notes),
        general_table(method_runs, edits, notes),
    ]
    points = [p for p in trajectory if p != edits and any(p in m.checkpoints for m in method_runs)]
    if points:
        tables.insert(1, trajectory_table(method_runs, points))
    return Leaderboard(edits=edits, tables=tables, runs=runs, notes=notes)


def unavailable_notes(method_runs: list[MethodRun], edits: int) -> list[str]:
    """One note per (metric, reason) that a task gave for not reporting it, naming the methods:
    an empty column should say why it is empty."""
    methods_by_reason: dict[tuple[str, str], list[str]] = {}
    for m in method_runs:
        checkpoint = m.checkpoints.get(edits)
        if checkpoint is None:
            continue
        reported = m.editing_at(edits)
        for key, reason in checkpoint.unavailable().items():
            if key not in reported:
                methods_by_reason.setdefault((key, reason), []).append(m.method)
    return [
        f"{EDITING_METRIC_BY_KEY[key].dataset.title} {EDITING_METRIC_BY_KEY[key].label} not "
        f"reported for {', '.join(dict.fromkeys(methods))}: {reason}"
        for (key, reason), methods in methods_by_reason.items()
    ]


def non_finite_notes(method_runs: list[MethodRun]) -> list[str]:
    """Every checkpoint metric that is NaN/Inf, by method (a numerical fault, or a metric such as
    MCC undefined on the documents scored): the tables show it as such and never rank it."""
    notes = []
    for m in method_runs:
        for edits in m.checkpoints:
            faulty = [key for key, v in {**m.editing_at(edits), **m.general_at(edits)}.items() if not v.finite]
            if faulty:
                names = ", ".join(k.label if isinstance(k, GeneralMetric) else EDITING_METRIC_BY_KEY[k].label
                                  for k in faulty)
                notes.append(f"{m.run_path.name}/{m.method} at {edits} edits: {names} computed as NaN/Inf "
                             f"(a numerical fault in the run, "
                             f"or a metric undefined on these documents; shown as {NOT_A_NUMBER!r}, not ranked)")
    return notes


def default_edits(method_runs: list[MethodRun]) -> int:
    """The largest number of edits at which every method of every run has been evaluated.

    A method still waiting for its first evaluation is left out (its cells say so) rather than
    holding every other method back at nothing.
    """
    reached = [set(m.checkpoints) for m in method_runs if m.checkpoints]
    common = set.intersection(*reached) - {0} if reached else set()
    if not common:
        available = "; ".join(f"{m.run_path.name}/{m.method}: {_edits_list(m)}" for m in method_runs)
        raise RunDirError(
            "the runs share no evaluated checkpoint after editing, so there is no common point "
            f"to compare; pass --edits N to choose one (evaluated: {available})"
        )
    return max(common)


def editing_table(method_runs: list[MethodRun], edits: int, notes: list[str]) -> Table:
    columns = [Column(s.key, s.dataset.title, s.label) for s in EDITING_METRICS]
    rows = []
    for model in _unique(m.model for m in method_runs):
        of_model = [m for m in method_runs if m.model == model]
        pre = _merge(of_model, 0, MethodRun.editing_at)
        notes.extend(pre.disagreement_notes(f"{PRE_EDITED} {model}, editing metrics"))
        rows.append(Row(model, (PRE_EDITED, model), 0, reference=True, values=pre.values))
        names = row_names(of_model)
        for method in _unique(names.values()):
            merged = _merge([m for m in of_model if names[id(m)] == method], edits,
                            MethodRun.editing_at)
            notes.extend(merged.conflict_notes(f"{method} on {model}"))
            rows.append(Row(model, (method, model), edits, values=merged.values))
    columns, rows = _without_empty(columns, rows)
    _mark_best(columns, rows)
    return Table(
        name="editing",
        title=f"Editing performance after {edits:,} edits",
        description=(
            "CounterFact and ZsRE metrics x100, mean ± standard error over the edited records (where "
            "a checkpoint scored a sample of them, the stratified estimate), higher is better. Best "
            f"per model in bold; {MISSING} = not reported."
        ),
        key_headers=("Method", "Model"),
        columns=columns,
        rows=rows,
        show_stderr=True,
        show_change=False,
        definitions=[(f"{s.dataset.title} {s.label}", s.definition) for s in EDITING_METRICS
                     if s.key in {c.key for c in columns}],
    )


def trajectory_table(method_runs: list[MethodRun], points: list[int]) -> Table:
    """The editing metrics of each method at a few earlier numbers of edits, side by side: where
    the methods part ways on the way to the headline point."""
    reported = {k for m in method_runs for p in points for k in m.editing_at(p)}
    specs = [s for s in EDITING_METRICS if s.name in TRAJECTORY_METRICS and s.key in reported]
    columns = [Column((p, s.key), s.dataset.title, f"{s.label} @{p:,}") for s in specs for p in points]
    rows = []
    for model in _unique(m.model for m in method_runs):
        of_model = [m for m in method_runs if m.model == model]
        names = row_names(of_model)
        for method in _unique(names.values()):
            values = {}
            for p in points:
                merged = _merge([m for m in of_model if names[id(m)] == method], p, MethodRun.editing_at)
                values.update({(p, key): v for key, v in merged.values.items()})
            rows.append(Row(model, (method, model), max(points), values=values))
    columns, rows = _without_empty(columns, rows)
    _mark_best(columns, rows)
    shown = ", ".join(f"{p:,}" for p in points)
    return Table(
        name="trajectory",
        title=f"Editing performance at {shown} edits",
        description=(f"The editing metrics at {shown} edits, as in the table above; where the methods "
                     f"part ways before the headline point. Best per model in bold; {MISSING} = not "
                     "evaluated there."),
        key_headers=("Method", "Model"),
        columns=columns,
        rows=rows,
        show_stderr=True,
        show_change=False,
    )


def general_table(method_runs: list[MethodRun], edits: int, notes: list[str]) -> Table:
    rows = []
    for model in _unique(m.model for m in method_runs):
        of_model = [m for m in method_runs if m.model == model]
        pre = _merge(of_model, 0, MethodRun.general_at)
        notes.extend(pre.disagreement_notes(f"{PRE_EDITED} {model}, general capability"))
        rows.append(Row(model, (PRE_EDITED, model, MISSING), 0, reference=True, values=pre.values))
        names = row_names(of_model)
        for method, edit_data in _unique((names[id(m)], m.edit_data) for m in of_model):
            sources = [m for m in of_model if (names[id(m)], m.edit_data) == (method, edit_data)]
            merged = _merge(sources, edits, MethodRun.general_at)
            notes.extend(merged.conflict_notes(f"{method} on {model} edited with {edit_data}"))
            rows.append(Row(model, (method, model, edit_data or MISSING), edits, values=merged.values))
    metrics = _unique(key for row in rows for key in row.values)
    metrics = sorted(metrics, key=lambda g: g.task)  # stable: lm-eval's metric order per task
    columns = [
        Column(g, g.task, g.label, _higher_is_better(g, method_runs), GENERAL_DECIMALS)
        for g in metrics
    ]
    for row in rows:
        if row.reference:
            continue
        reference = next(r for r in rows if r.reference and r.model == row.model)
        for key, value in row.values.items():
            if key in reference.values and value.finite and reference.values[key].finite:
                change = relative_change(value.mean, reference.values[key].mean)
                if change is not None:
                    row.change[key] = change
    columns, rows = _without_empty(columns, rows)
    _mark_best(columns, rows)
    return Table(
        name="general",
        title=f"General capability after {edits:,} edits",
        description=(
            "Each task's lm-eval metrics (± its standard error where lm-eval gives one; each edit_glue "
            "subset's likelihood accuracy besides the pooled metrics); in brackets the relative change "
            f"from the pre-edited model. Best per model in bold (↓ = lower is better); {MISSING} = not "
            "reported."
        ),
        key_headers=("Method", "Model", "Edit data"),
        columns=columns,
        rows=rows,
        show_stderr=True,
        show_change=True,
    )


def relative_change(value: float, reference: float) -> float | None:
    """Percent change from the reference; None where the reference is zero."""
    if reference == 0:
        return None
    return (value - reference) / abs(reference) * 100.0


@dataclass
class _Merged:
    values: dict
    providers: dict  # key -> run directory names that reported it, in preference order
    differing: dict  # key -> run directory names whose values of it differ from the shown one

    def conflict_notes(self, what: str) -> list[str]:
        clashes = sorted({tuple(runs) for runs in self.providers.values() if len(runs) > 1})
        return [
            f"{what}: the runs {', '.join(runs)} report the same metrics; showing {runs[0]} "
            "(the first given)"
            for runs in clashes
        ]

    def disagreement_notes(self, what: str) -> list[str]:
        """The pre-edited rows of runs that lent one another their checkpoint agree; those of runs
        that scored different records (samples drawn over different numbers of edits) do not, and
        the reader is told whose row is shown."""
        clashes = sorted({(self.providers[key][0], *runs) for key, runs in self.differing.items() if runs})
        return [
            f"{what}: the pre-edited checkpoints of {', '.join(runs[1:])} differ from that of {runs[0]} "
            f"by more than round-off (they scored other records); showing {runs[0]} (the first given)"
            for runs in clashes
        ]


def _same(a: float, b: float) -> bool:
    # two machines' BLAS differ in the fifth or sixth digit of a perplexity: that is not a difference
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))


def _merge(sources: list[MethodRun], edits: int, extract: Callable) -> _Merged:
    """Combine one point of several method runs, metric by metric.

    ``extract`` is ``MethodRun.editing_at`` or ``MethodRun.general_at``. A metric comes from the
    first run (in command-line order) that reports it, runs with recognisable edit data first.
    """
    reported = [(m, extract(m, edits)) for m in sources]
    reported.sort(key=lambda item: item[0].dataset is None)
    values, providers, differing = {}, {}, {}
    for key in _unique(k for _, found in reported for k in found):
        candidates = [(m, found[key]) for m, found in reported if key in found]
        values[key] = candidates[0][1]
        providers[key] = _unique(m.run_path.name for m, _ in candidates)
        differing[key] = _unique(m.run_path.name for m, v in candidates
                                 if not _same(v.mean, candidates[0][1].mean))
    return _Merged(values, providers, differing)


def _higher_is_better(metric: GeneralMetric, method_runs: list[MethodRun]) -> bool:
    """lm-eval's own direction for the metric where a results file records it; else higher."""
    for m in method_runs:
        for checkpoint in m.checkpoints.values():
            direction = checkpoint.higher_is_better(metric)
            if direction is not None:
                return bool(direction)
    return True


def _without_empty(columns: list[Column], rows: list[Row]) -> tuple[list[Column], list[Row]]:
    """Leave out the rows and the columns that hold no value at all: a table of dashes says
    nothing the notes do not say better."""
    rows = [r for r in rows if r.values]
    present = {key for r in rows for key in r.values}
    return [c for c in columns if c.key in present], rows


def _mark_best(columns: list[Column], rows: list[Row]) -> None:
    for model in _unique(r.model for r in rows):
        candidates = [r for r in rows if r.model == model and not r.reference]
        for col in columns:
            # compare what is displayed, so two cells that read the same are both marked
            shown = {
                id(r): round(r.values[col.key].mean, col.decimals)
                for r in candidates if col.key in r.values and r.values[col.key].finite
            }
            if not shown or sum(col.key in r.values for r in candidates) < 2:
                continue  # a lone method is not "best" at anything: nothing to compare it with
            best = max(shown.values()) if col.higher_is_better else min(shown.values())
            for r in candidates:
                if shown.get(id(r)) == best:
                    r.best.add(col.key)


def row_names(method_runs: list[MethodRun]) -> dict[int, str]:
    """The row of each run (by ``id``): its method, so that one method's runs on different edit
    data fill one row; where runs of a method share their edit data (the cells of a sweep over a
    setting, such as LyapLock's alpha), each is its own row, named by its run directory."""
    names = {}
    for m in method_runs:
        shared = sum(o.method == m.method and o.model == m.model and o.edit_data == m.edit_data
                     for o in method_runs)
        names[id(m)] = f"{m.method} ({m.run_path.name})" if shared > 1 else m.method
    return names


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _edits_list(m: MethodRun) -> str:
    return ", ".join(str(e) for e in m.checkpoints) or "none"


# ---------------------------------------------------------------------------- rendering


def cell_text(table: Table, row: Row, col: Column) -> str:
    value: Measurement | None = row.values.get(col.key)
    if value is None:
        return MISSING
    if not value.finite:
        return NOT_A_NUMBER
    text = f"{value.mean:.{col.decimals}f}"
    if table.show_stderr and value.stderr is not None:
        text += f" ± {value.stderr:.{col.decimals}f}"
    if table.show_change and col.key in row.change:
        text += f" ({row.change[col.key]:+.1f}%)"
    return text


def table_to_markdown(table: Table) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = [*table.key_headers, *(c.title for c in table.columns)]
    lines = [
        "| " + " | ".join(escape(h) for h in header) + " |",
        "|" + "|".join([":---"] * len(table.key_headers) + ["---:"] * len(table.columns)) + "|",
    ]
    for row in table.rows:
        cells = [f"*{escape(x)}*" if row.reference and i == 0 else escape(x)
                 for i, x in enumerate(row.labels)]
        for col in table.columns:
            text = escape(cell_text(table, row, col))
            cells.append(f"**{text}**" if col.key in row.best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_to_csv(table: Table) -> str:
    """Numbers at full precision, one column per number; best cells have "*" in "<col> best"."""
    header = [*table.key_headers, "Edits"]
    for col in table.columns:
        header.append(col.title)
        if table.show_stderr:
            header.append(f"{col.title} stderr")
        if table.show_change:
            header.append(f"{col.title} change %")
        header.append(f"{col.title} best")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        record = [*row.labels, row.edits]
        for col in table.columns:
            value = row.values.get(col.key)
            record.append("" if value is None else repr(value.mean))
            if table.show_stderr:
                stderr = None if value is None else value.stderr
                record.append("" if stderr is None else repr(stderr))
            if table.show_change:
                change = row.change.get(col.key)
                record.append("" if change is None else repr(change))
            record.append("*" if col.key in row.best else "")
        writer.writerow(record)
    return buffer.getvalue()


def table_to_html(table: Table) -> str:
    """An HTML fragment: the table with two header rows (dataset or task over its metrics)."""
    e = html.escape
    top = [f'<th rowspan="2" scope="col">{e(h)}</th>' for h in table.key_headers]
    for group in _unique(c.group for c in table.columns):
        span = sum(1 for c in table.columns if c.group == group)
        top.append(f'<th colspan="{span}" scope="colgroup">{e(group)}</th>')
    sub = [
        f'<th scope="col">{e(c.label)}{"" if c.higher_is_better else " ↓"}</th>'
        for c in table.columns
    ]
    body = []
    previous_model = None
    for row in table.rows:
        classes = []
        if row.reference:
            classes.append("reference")
        if row.model != previous_model:
            classes.append("block-start")
        previous_model = row.model
        cells = [f"<th scope=\"row\">{e(row.labels[0])}</th>"]
        cells += [f"<td>{e(x)}</td>" for x in row.labels[1:]]
        for col in table.columns:
            text = e(cell_text(table, row, col))
            if col.key in row.best:
                cells.append(f'<td class="num best"><strong>{text}</strong></td>')
            elif col.key in row.values and not row.values[col.key].finite:
                cells.append(f'<td class="num fault" title="the run computed NaN/Inf: not ranked">{text}</td>')
            else:
                cells.append(f'<td class="num">{text}</td>')
        body.append(f'<tr class="{" ".join(classes)}">' + "".join(cells) + "</tr>")
    parts = [
        f'<section class="table" id="{e(table.name)}">',
        f"<h2>{e(table.title)}</h2>",
        f"<p>{e(table.description)}</p>",
        '<div class="scroll"><table>',
        "<thead><tr>" + "".join(top) + "</tr><tr>" + "".join(sub) + "</tr></thead>",
        "<tbody>" + "\n".join(body) + "</tbody>",
        "</table></div>",
    ]
    if table.definitions:
        parts.append("<dl>" + "".join(
            f"<dt>{e(term)}</dt><dd>{e(text)}</dd>" for term, text in table.definitions
        ) + "</dl>")
    parts.append("</section>")
    return "\n".join(parts)


PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1rem; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border: 1px solid #c8c8c8; padding: 0.3rem 0.55rem; white-space: nowrap; }
thead th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.reference { background: #f6f6f6; font-style: italic; }
tr.block-start > * { border-top: 2px solid #777; }
td.best { background: #e3f4e1; }
td.fault { background: #fbe0e0; color: #a00; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1rem;
     font-size: 0.85rem; color: #444; }
dt { font-weight: 600; } dd { margin: 0; }
ul.notes { font-size: 0.85rem; color: #7a4b00; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto;
         border: 1px solid #ddd; } figcaption { font-size: 0.85rem; color: #444; }
code { font-size: 0.85em; }
"""


def html_page(title: str, body: str) -> str:
    """A standalone page: inline CSS, no scripts, no external assets."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f'<h2>Notes</h2>\n<ul class="notes">{items}</ul>'


def sources_html(runs: list[RunDir]) -> str:
    items = "".join(
        f"<li><code>{html.escape(str(r.path))}</code>: {html.escape(r.model)}, edit data "
        f"{html.escape(str(r.config.get('edit_data', MISSING)))}, methods "
        f"{html.escape(', '.join(m.method for m in r.methods) or MISSING)}</li>"
        for r in runs
    )
    return f"<h2>Runs</h2>\n<ul>{items}</ul>"


def leaderboard_title(board: Leaderboard) -> str:
    return f"Sequential editing leaderboard: {board.edits:,} edits"


def leaderboard_markdown(board: Leaderboard) -> str:
    parts = [f"# {leaderboard_title(board)}"]
    for table in board.tables:
        parts += [f"## {table.title}", table.description, table_to_markdown(table)]
        if table.definitions:
            parts.append("\n".join(f"- **{term}**: {text}" for term, text in table.definitions))
    parts.append("## Runs\n" + "\n".join(
        f"- `{r.path}`: {r.model}, edit data {r.config.get('edit_data', MISSING)}, methods "
        f"{', '.join(m.method for m in r.methods) or MISSING}"
        for r in board.runs
    ))
    if board.notes:
        parts.append("## Notes\n" + "\n".join(f"- {n}" for n in board.notes))
    return "\n\n".join(parts) + "\n"


def leaderboard_html(board: Leaderboard) -> str:
    body = "\n".join(table_to_html(t) for t in board.tables)
    return html_page(
        leaderboard_title(board),
        body + "\n" + sources_html(board.runs) + "\n" + notes_html(board.notes),
    )


def write_leaderboard(board: Leaderboard, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {
        out / f"{name}.md": leaderboard_markdown(board),
        out / f"{name}.html": leaderboard_html(board),
        **{out / f"{name}_{t.name}.csv": table_to_csv(t) for t in board.tables},
    }
    for path, text in written.items():
        path.write_text(text, encoding="utf-8")
    return list(written)


# ---------------------------------------------------------------------------- command


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _points(text: str) -> list[int]:
    try:
        return [non_negative_int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers of edits, got {text!r}") from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared with ``seqedit report``."""
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR",
        help="run directories written by the sequential driver (or directories holding them)",
    )
    parser.add_argument(
        "--at", "--edits", dest="edits", type=non_negative_int, default=None, metavar="N",
        help="number of edits to compare at (default: the largest every run was evaluated at)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seqedit leaderboard",
        description="Leaderboard tables (Markdown, CSV, HTML) from sequential-editing runs.",
    )
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("leaderboards"),
                        help="output directory (default: leaderboards/)")
    parser.add_argument("--name", default="leaderboard",
                        help="file name stem of the outputs (default: leaderboard)")
    parser.add_argument("--trajectory", type=_points, default=list(TRAJECTORY_POINTS), metavar="N,N",
                        help="earlier numbers of edits for the trajectory table, where runs have them "
                             f"(default: {','.join(map(str, TRAJECTORY_POINTS))})")
    args = parser.parse_args(argv)
    try:
        board = build_leaderboard(load_runs(args.runs), args.edits, args.trajectory)
    except RunDirError as err:
        print(f"seqedit leaderboard: error: {err}", file=sys.stderr)
        return 2
    for path in write_leaderboard(board, args.out, args.name):
        print(f"wrote {path}")
    print()
    print(leaderboard_markdown(board))
    return 0


if __name__ == "__main__":
    sys.exit(main())
