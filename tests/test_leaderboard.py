"""Leaderboard tables from run directories (and the run-directory reader they share).

The fixture runs are written in the sequential driver's format with known numbers: a
CounterFact run (memit, alphaedit, lyaplock; 200 edits, evaluated every 50), a ZsRE run of the
same model (memit, lyaplock; 150 edits) and a CounterFact run of a second model (memit,
lyaplock; evaluated at 0 and 150). The largest number of edits every run reached is 150.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.runs import leaderboard
from harness.runs.resultsdir import (
    Checkpoint,
    GeneralMetric,
    RunDirError,
    dataset_of,
    load_runs,
    read_trace,
)

SMOLLM = "SmolLM2-135M-Instruct"
GEMMA = "gemma-3-270m-it"
LAYERS = ("4", "5", "6")
BATCH = 10
EVERY = 50

# CounterFact (efficacy, generalization, specificity, fluency) after e edits:
# start - drop * e / 50; the pre-edited model is PRE_CF for every method.
CF_TRAJECTORY = {
    SMOLLM: {
        "memit": ((96.0, 6.0), (90.0, 8.0), (80.0, 5.0), (630.0, 2.0)),
        "alphaedit": ((98.0, 1.0), (92.0, 2.0), (84.0, 1.0), (621.0, 2.0)),
        "lyaplock": ((99.0, 0.5), (93.0, 1.0), (81.0, 0.5), (622.0, 1.0)),
    },
    GEMMA: {
        "memit": ((99.0, 0.0), (95.0, 1.0), (70.0, 1.0), (600.0, 1.0)),
        "lyaplock": ((97.0, 0.5), (94.0, 1.0), (72.0, 1.0), (605.0, 1.0)),
    },
}
PRE_CF = (21.0, 23.0, 85.0, 625.0)
CF_STDERR = (1.5, 2.0, 1.2, 3.0)
# ZsRE (efficacy, generalization, specificity)
ZSRE_TRAJECTORY = {
    "memit": ((94.0, 5.0), (88.0, 5.0), (30.0, 1.0)),
    "lyaplock": ((96.0, 1.0), (90.0, 1.0), (31.0, 0.5)),
}
PRE_ZSRE = (35.0, 33.0, 31.0)
ZSRE_STDERR = (0.8, 0.9, 0.7)
# general capability: task -> metric key -> pre-edited value; each method loses
# GENERAL_DROP[method] per 50 edits (ZsRE runs lose half as much)
GENERAL_PRE = {
    "edit_glue_sst2": {"f1_generation,none": 0.64, "f1_likelihood,none": 0.70,
                       "accuracy,none": 0.66, "mcc,none": 0.30},
    "edit_glue_mmlu": {"f1_generation,none": 0.25, "accuracy,none": 0.28},
    "gsm8k_edit": {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.02},
}
GENERAL_DROP = {"memit": 0.01, "alphaedit": 0.004, "lyaplock": 0.002}


# what counterfact_edit_generation records when it cannot score consistency
NO_CONSISTENCY = "unavailable, not reported: no ROME reference data (idf.npy, ...)"


def _scores(names, values, stderrs):
    entry = {}
    for name, value, stderr in zip(names, values, stderrs):
        entry[f"{name},none"] = value
        entry[f"{name}_stderr,none"] = stderr
    return entry


def results_json(model_backend: str, cf=None, zsre=None, general=None, cf_fluency_stderr=True):
    """lm-eval's results JSON (as simple_evaluate returns it, minus samples)."""
    results, subtasks, higher = {}, {}, {}
    if cf is not None:
        results["counterfact_edit"] = {"alias": "counterfact_edit"}
        results["counterfact_edit_scores"] = {
            "alias": " - counterfact_edit_scores",
            **_scores(("efficacy", "generalization", "specificity"), cf[:3], CF_STDERR[:3]),
            "efficacy_magnitude,none": 41.0, "efficacy_magnitude_stderr,none": 2.0,
        }
        results["counterfact_edit_generation"] = {
            "alias": " - counterfact_edit_generation",
            "fluency,none": cf[3],
            "fluency_stderr,none": CF_STDERR[3] if cf_fluency_stderr else "N/A",
            # consistency needs the ROME attribute snippets: absent = unavailable
        }
        subtasks["counterfact_edit"] = ["counterfact_edit_scores", "counterfact_edit_generation"]
        higher["counterfact_edit_scores"] = {"efficacy": True, "generalization": True,
                                             "specificity": True, "efficacy_magnitude": True}
    if zsre is not None:
        results["zsre_edit_scores"] = {
            "alias": "zsre_edit_scores",
            **_scores(("efficacy", "generalization", "specificity"), zsre, ZSRE_STDERR),
        }
        subtasks["zsre_edit_scores"] = []
    for task, metrics in (general or {}).items():
        results[task] = {"alias": task}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            results[task][key] = value
            results[task][f"{name}_stderr,{filt}"] = 0.05
        subtasks[task] = []
        higher[task] = {key.partition(",")[0]: True for key in metrics}
    return {
        "results": results,
        "group_subtasks": subtasks,
        "configs": {t: {"task": t, **({"metadata": {"consistency": NO_CONSISTENCY}}
                                      if t == "counterfact_edit_generation" else {})}
                    for t in results},
        "versions": {t: 1.0 for t in results},
        "n-shot": {t: 0 for t in results},
        "higher_is_better": higher,
        "n-samples": {t: {"original": 100, "effective": 100} for t in results},
        "config": {"model": model_backend, "model_args": "edit_data=counterfact,num_edits=200",
                   "batch_size": 16},
        "git_hash": "0123abc",
        "date": 1763700000.0,
    }


def trace_entries(method: str, num_edits: int) -> list[dict]:
    """Per-batch trace: MEMIT-like methods drift freely, LyapLock holds near its threshold."""
    entries = []
    queue = {}
    for batch in range(num_edits // BATCH):
        layers = {}
        for i, layer in enumerate(LAYERS):
            scale = 1e-4 * (i + 1)
            if method == "lyaplock":
                threshold = 60 * scale
                loss = min(scale * (batch + 1) ** 2, threshold * 1.3)
                q = max(queue.get(layer, 1.0) + (loss - threshold) / threshold, 1.0)
                queue[layer] = q
                layers[layer] = {"preservation_loss": loss, "threshold": threshold,
                                 "queue": q * (60 * scale) ** 0.5, "q": q, "update_norm": 0.5}
            else:
                growth = 2.0 if method == "memit" else 1.5
                layers[layer] = {"preservation_loss": scale * (batch + 1) ** growth,
                                 "update_norm": 0.4 + 0.01 * batch}
        entries.append({"method": method, "batch": batch, "edits_done": (batch + 1) * BATCH,
                        "edit_seconds": 3.0 + 0.1 * (batch % 3), "target_loss": 0.03,
                        "layers": layers})
    return entries


def write_run(root: Path, name: str, model: str, edit_data: str, methods: list[str],
              num_edits: int, eval_points: list[int]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    manifest = {
        "config": {"model": "smollm2" if model == SMOLLM else "gemma3", "methods": methods,
                   "edit_data": edit_data, "num_edits": num_edits, "edit_batch_size": BATCH,
                   "eval_every": EVERY, "tasks": ["counterfact_edit", "edit_glue_sst2"],
                   "seed": 0},
        "model_name": model,
        "versions": {"lm_eval": "0.4.13", "torch": "2.5.1", "harness": "0.1.0"},
        "git_commit": "f00dfeedcafe0123456789abcdef0123456789ab",
        "hardware": {"device": "cpu", "threads": 2},
        "started": "2025-11-22T05:00:00Z",
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    for method in methods:
        mdir = run / method
        mdir.mkdir()
        (mdir / "trace.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in trace_entries(method, num_edits)))
        for edits in eval_points:
            k = edits / EVERY
            general = {
                task: {key: max(pre - GENERAL_DROP[method] * k * (0.5 if edit_data == "zsre"
                                                                   else 1), 0.0)
                       for key, pre in metrics.items()}
                for task, metrics in GENERAL_PRE.items()
            }
            general["gsm8k_edit"]["exact_match,strict-match"] = 0.0
            if edit_data == "counterfact":
                traj = CF_TRAJECTORY[model][method]
                cf = PRE_CF if edits == 0 else tuple(a - d * k for a, d in traj)
                # the ZsRE task run alongside scores CounterFact records: not ZsRE numbers
                results = results_json(f"{method}_hf", cf=cf, zsre=(0.0, 0.0, 0.0),
                                       general=general, cf_fluency_stderr=method != "memit")
            else:
                traj = ZSRE_TRAJECTORY[method]
                zsre = PRE_ZSRE if edits == 0 else tuple(a - d * k for a, d in traj)
                results = results_json(f"{method}_hf", zsre=zsre, general=general)
            cdir = mdir / "checkpoints" / f"edits_{edits:06d}"
            cdir.mkdir(parents=True)
            (cdir / "results.json").write_text(json.dumps(results))
    return run


def write_fixture_runs(root: Path) -> list[Path]:
    return [
        write_run(root, "smollm2_counterfact", SMOLLM, "counterfact",
                  ["memit", "alphaedit", "lyaplock"], 200, [0, 50, 100, 150, 200]),
        write_run(root, "smollm2_zsre", SMOLLM, "zsre", ["memit", "lyaplock"], 150,
                  [0, 50, 100, 150]),
        write_run(root, "gemma_counterfact", GEMMA, "counterfact", ["memit", "lyaplock"], 150,
                  [0, 150]),
    ]


@pytest.fixture
def fixture_runs(tmp_path) -> list[Path]:
    return write_fixture_runs(tmp_path / "runs")


def row_of(table, method, model, edit_data=None):
    matches = [r for r in table.rows if r.labels[:2] == (method, model)
               and (edit_data is None or r.labels[2] == edit_data)]
    assert len(matches) == 1, [r.labels for r in table.rows]
    return matches[0]


def texts(table, row):
    return {c.title: leaderboard.cell_text(table, row, c) for c in table.columns}


# ---------------------------------------------------------------------------- the editing table


def test_default_edits_is_largest_point_every_run_reached(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs))
    assert board.edits == 150
    only_cf = leaderboard.build_leaderboard(load_runs(fixture_runs[:1]))
    assert only_cf.edits == 200


def test_editing_table_layout_and_values(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs))
    table = board.tables[0]
    assert table.key_headers == ("Method", "Model")
    assert [c.title for c in table.columns] == [
        "CounterFact Eff.", "CounterFact Gen.", "CounterFact Spe.", "CounterFact Flu.",
        "ZsRE Eff.", "ZsRE Gen.", "ZsRE Spe.",
    ]  # no run reports consistency: no column of dashes (a note says why)
    # model blocks in order of appearance, pre-edited first, methods as the manifests list them
    assert [r.labels for r in table.rows] == [
        ("Pre-edited", SMOLLM), ("memit", SMOLLM), ("alphaedit", SMOLLM), ("lyaplock", SMOLLM),
        ("Pre-edited", GEMMA), ("memit", GEMMA), ("lyaplock", GEMMA),
    ]
    # 150 edits = 3 x 50: memit 96 - 3*6 = 78 etc.; the CounterFact and the ZsRE run merged
    assert texts(table, row_of(table, "memit", SMOLLM)) == {
        "CounterFact Eff.": "78.00 ± 1.50",
        "CounterFact Gen.": "66.00 ± 2.00",
        "CounterFact Spe.": "65.00 ± 1.20",
        "CounterFact Flu.": "624.00",  # its stderr is "N/A"
        "ZsRE Eff.": "79.00 ± 0.80",
        "ZsRE Gen.": "73.00 ± 0.90",
        "ZsRE Spe.": "27.00 ± 0.70",
    }
    lyap = texts(table, row_of(table, "lyaplock", SMOLLM))
    assert lyap["CounterFact Eff."] == "97.50 ± 1.50"
    assert lyap["ZsRE Eff."] == "93.00 ± 0.80"
    assert lyap["ZsRE Spe."] == "29.50 ± 0.70"
    # alphaedit has no ZsRE run: the ZsRE task inside its CounterFact run does not count
    alpha = texts(table, row_of(table, "alphaedit", SMOLLM))
    assert alpha["ZsRE Eff."] == alpha["ZsRE Gen."] == alpha["ZsRE Spe."] == "—"
    assert alpha["CounterFact Spe."] == "81.00 ± 1.20"
    pre = texts(table, row_of(table, "Pre-edited", SMOLLM))
    assert pre["CounterFact Eff."] == "21.00 ± 1.50"
    assert pre["ZsRE Eff."] == "35.00 ± 0.80"  # from the ZsRE run's edits_000000, not 0.00
    gemma_pre = texts(table, row_of(table, "Pre-edited", GEMMA))
    assert gemma_pre["ZsRE Eff."] == "—"


def test_best_marked_per_model_and_never_pre_edited(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs))
    table = board.tables[0]
    best = {r.labels: {c.title for c in table.columns if c.key in r.best} for r in table.rows}
    assert best[("lyaplock", SMOLLM)] == {"CounterFact Eff.", "CounterFact Gen.",
                                          "ZsRE Eff.", "ZsRE Gen.", "ZsRE Spe."}
    assert best[("alphaedit", SMOLLM)] == {"CounterFact Spe."}  # 81.0 > 79.5 > 65.0
    assert best[("memit", SMOLLM)] == {"CounterFact Flu."}  # 624 > 619 > 615
    # the second model is its own block: memit's 99.0 efficacy wins there
    assert "CounterFact Eff." in best[("memit", GEMMA)]
    assert "CounterFact Eff." not in best[("lyaplock", GEMMA)]
    # pre-edited specificity (85.0) and fluency (625.0) are higher but never "best"
    assert best[("Pre-edited", SMOLLM)] == set() == best[("Pre-edited", GEMMA)]
    # an all-unavailable column has no best
    assert not any("CounterFact Consis." in b for b in best.values())


def test_ties_at_display_precision_are_all_marked(tmp_path):
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit", "lyaplock"], 50, [0, 50])
    for method, efficacy in (("memit", 90.001), ("lyaplock", 89.999)):
        path = run / method / "checkpoints" / "edits_000050" / "results.json"
        data = json.loads(path.read_text())
        data["results"]["counterfact_edit_scores"]["efficacy,none"] = efficacy
        path.write_text(json.dumps(data))
    table = leaderboard.build_leaderboard(load_runs([run])).tables[0]
    eff = next(c for c in table.columns if c.title == "CounterFact Eff.")
    marked = [r.labels[0] for r in table.rows if eff.key in r.best]
    assert marked == ["memit", "lyaplock"]  # both read 90.00


def test_explicit_edits_and_missing_checkpoint(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs), edits=200)
    table = board.tables[0]
    assert texts(table, row_of(table, "memit", SMOLLM))["CounterFact Eff."] == "72.00 ± 1.50"
    # the ZsRE run stopped at 150: unavailable at 200, and said so
    assert texts(table, row_of(table, "memit", SMOLLM))["ZsRE Eff."] == "—"
    # the Gemma runs stopped at 150: their rows are left out, the notes say why
    assert [r.labels[0] for r in table.rows if r.model == GEMMA] == ["Pre-edited"]
    assert any("smollm2_zsre/memit: no evaluated checkpoint at 200 edits" in n
               for n in board.notes)


def test_no_common_checkpoint_names_the_fix(tmp_path):
    a = write_run(tmp_path, "a", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    b = write_run(tmp_path, "b", SMOLLM, "zsre", ["memit"], 100, [0, 100])
    with pytest.raises(RunDirError, match="--edits N"):
        leaderboard.build_leaderboard(load_runs([a, b]))


def test_runs_of_one_method_on_the_same_data_are_rows_named_by_their_directory(tmp_path):
    """The cells of a sweep over a setting (LyapLock's alpha, say) each keep their row; a run of
    the same method on other edit data still fills the row of its method."""
    first = write_run(tmp_path / "sweep", "alpha-2", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    second = write_run(tmp_path / "sweep", "alpha-4", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    zsre = write_run(tmp_path, "zsre_run", SMOLLM, "zsre", ["memit"], 50, [0, 50])
    path = second / "memit" / "checkpoints" / "edits_000050" / "results.json"
    data = json.loads(path.read_text())
    data["results"]["counterfact_edit_scores"]["efficacy,none"] = 12.0
    path.write_text(json.dumps(data))
    board = leaderboard.build_leaderboard(load_runs([first, second, zsre]))
    table = board.tables[0]
    assert texts(table, row_of(table, "memit (alpha-2)", SMOLLM))["CounterFact Eff."] == "90.00 ± 1.50"
    assert texts(table, row_of(table, "memit (alpha-4)", SMOLLM))["CounterFact Eff."].startswith("12.00")
    assert texts(table, row_of(table, "memit", SMOLLM))["CounterFact Eff."] == leaderboard.MISSING
    assert texts(table, row_of(table, "memit", SMOLLM))["ZsRE Eff."] != leaderboard.MISSING
    assert not any("report the same metrics" in n for n in board.notes)
    general = board.tables[-1]
    assert {r.labels[0] for r in general.rows if not r.reference} == {"memit (alpha-2)", "memit (alpha-4)", "memit"}


def test_pre_edited_rows_that_differ_between_runs_are_noted_and_round_off_is_not(tmp_path):
    """A 3,000-edit run and a 10,000-edit run score their pre-edited model on samples drawn over
    different records: the board shows the first run's row and says the other differs; a
    perplexity that differs in its sixth digit (another machine) is the same."""
    short = write_run(tmp_path, "short", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    long = write_run(tmp_path, "long", SMOLLM, "counterfact", ["alphaedit"], 50, [0, 50])
    path = long / "alphaedit" / "checkpoints" / "edits_000000" / "results.json"
    data = json.loads(path.read_text())
    data["results"]["edit_glue_sst2"]["accuracy,none"] *= 1 + 2e-6
    path.write_text(json.dumps(data))
    board = leaderboard.build_leaderboard(load_runs([short, long]))
    assert not any("pre-edited checkpoints" in n for n in board.notes)

    data["results"]["counterfact_edit_scores"]["efficacy,none"] = 30.0
    path.write_text(json.dumps(data))
    board = leaderboard.build_leaderboard(load_runs([short, long]))
    notes = [n for n in board.notes if "pre-edited checkpoints" in n]
    assert notes == [f"Pre-edited {SMOLLM}, editing metrics: the pre-edited checkpoints of long differ from "
                     "that of short by more than round-off (they scored other records); showing short (the first given)"]
    table = board.tables[0]
    assert texts(table, row_of(table, "Pre-edited", SMOLLM))["CounterFact Eff."].startswith(f"{PRE_CF[0]:.2f}")


# ---------------------------------------------------------------------------- general capability


def test_relative_change_arithmetic():
    assert leaderboard.relative_change(0.61, 0.64) == pytest.approx(-4.6875)
    assert leaderboard.relative_change(0.66, 0.60) == pytest.approx(10.0)
    assert leaderboard.relative_change(-0.1, -0.2) == pytest.approx(50.0)  # mcc can be < 0
    assert leaderboard.relative_change(0.3, 0.0) is None


def test_general_table_values_changes_and_best(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs))
    table = board.tables[1]
    assert table.key_headers == ("Method", "Model", "Edit data")
    titles = [c.title for c in table.columns]
    assert titles[:2] == ["edit_glue_mmlu f1_generation", "edit_glue_mmlu accuracy"]
    assert "gsm8k_edit exact_match [strict-match]" in titles
    assert "gsm8k_edit exact_match [flexible-extract]" in titles
    assert not any(t.startswith(("counterfact", "zsre")) for t in titles)
    # the ZsRE-edited and the CounterFact-edited memit are different models: two rows
    assert [r.labels for r in table.rows if r.model == SMOLLM] == [
        ("Pre-edited", SMOLLM, "—"), ("memit", SMOLLM, "counterfact"),
        ("alphaedit", SMOLLM, "counterfact"), ("lyaplock", SMOLLM, "counterfact"),
        ("memit", SMOLLM, "zsre"), ("lyaplock", SMOLLM, "zsre"),
    ]
    sst2 = "edit_glue_sst2 f1_generation"
    cells = {r.labels: texts(table, r)[sst2] for r in table.rows if r.model == SMOLLM}
    assert cells[("Pre-edited", SMOLLM, "—")] == "0.640 ± 0.050"
    assert cells[("memit", SMOLLM, "counterfact")] == "0.610 ± 0.050 (-4.7%)"  # 0.64 - 3 * 0.01
    assert cells[("alphaedit", SMOLLM, "counterfact")] == "0.628 ± 0.050 (-1.9%)"
    assert cells[("memit", SMOLLM, "zsre")] == "0.625 ± 0.050 (-2.3%)"  # half the drop
    assert cells[("lyaplock", SMOLLM, "zsre")] == "0.637 ± 0.050 (-0.5%)"
    col = next(c for c in table.columns if c.title == sst2)
    best = [r.labels for r in table.rows if col.key in r.best]
    assert best == [("lyaplock", SMOLLM, "zsre"), ("lyaplock", GEMMA, "counterfact")]
    # a zero pre-edited value has no relative change; equal values tie for best
    gsm = next(c for c in table.columns if c.title == "gsm8k_edit exact_match [strict-match]")
    memit = row_of(table, "memit", SMOLLM, "counterfact")
    assert leaderboard.cell_text(table, memit, gsm) == "0.000 ± 0.050"
    assert gsm.key in memit.best


def test_lower_is_better_comes_from_lm_eval(tmp_path):
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit", "lyaplock"], 50, [0, 50])
    for method, ppl in (("memit", 30.0), ("lyaplock", 25.0)):
        for edits, value in ((0, 20.0), (50, ppl)):
            path = run / method / "checkpoints" / f"edits_{edits:06d}" / "results.json"
            data = json.loads(path.read_text())
            data["results"]["wikitext"] = {"alias": "wikitext", "word_perplexity,none": value,
                                           "word_perplexity_stderr,none": "N/A"}
            data["higher_is_better"]["wikitext"] = {"word_perplexity": False}
            path.write_text(json.dumps(data))
    table = leaderboard.build_leaderboard(load_runs([run])).tables[1]
    col = next(c for c in table.columns if c.group == "wikitext")
    assert col.title == "wikitext word_perplexity ↓"
    assert [r.labels[0] for r in table.rows if col.key in r.best] == ["lyaplock"]
    assert leaderboard.cell_text(table, row_of(table, "lyaplock", SMOLLM), col) == \
        "25.000 (+25.0%)"


# ---------------------------------------------------------------------------- outputs


class _TableCells(HTMLParser):
    """Rows of every <tbody> as [(text, is_bold)]."""

    def __init__(self):
        super().__init__()
        self.rows, self.in_body, self.bold, self.cell = [], False, False, None

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append([])
        elif tag in ("td", "th") and self.in_body:
            self.cell, self.bold = "", False
        elif tag == "strong":
            self.bold = True

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append((self.cell, self.bold))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_command_writes_markdown_csv_and_html(fixture_runs, tmp_path, capsys):
    out = tmp_path / "boards"
    # a parent directory of runs is accepted too
    assert leaderboard.main([str(fixture_runs[0].parent), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "leaderboard.html", "leaderboard.md", "leaderboard_editing.csv", "leaderboard_general.csv",
    ]
    assert "| lyaplock | SmolLM2-135M-Instruct | **97.50 ± 1.50** |" in capsys.readouterr().out

    markdown = (out / "leaderboard.md").read_text()
    assert "# Sequential editing leaderboard: 150 edits" in markdown
    assert "| *Pre-edited* | SmolLM2-135M-Instruct | 21.00 ± 1.50 |" in markdown
    assert "| memit | SmolLM2-135M-Instruct | 78.00 ± 1.50 | 66.00 ± 2.00 | 65.00 ± 1.20 | " \
           "**624.00** | 79.00 ± 0.80 |" in markdown
    assert "**0.637 ± 0.050 (-0.5%)**" in markdown

    page = (out / "leaderboard.html").read_text()
    assert "<style>" in page and "<script" not in page and "http" not in page.split("<body>")[0]
    parser = _TableCells()
    parser.feed(page)
    lyap = next(r for r in parser.rows if r[0][0] == "lyaplock" and r[1][0] == SMOLLM)
    assert lyap[2] == ("97.50 ± 1.50", True)  # CounterFact Eff., bold
    assert lyap[4] == ("79.50 ± 1.20", False)  # CounterFact Spe. (alphaedit's 81.00 is best)
    pre = next(r for r in parser.rows if r[0][0] == "Pre-edited")
    assert not any(bold for _, bold in pre)


def test_csv_parses_back_to_the_numbers(fixture_runs, tmp_path):
    out = tmp_path / "boards"
    assert leaderboard.main([*map(str, fixture_runs), "--out", str(out), "--name", "lb"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "lb_editing.csv").read_text())))
    memit = next(r for r in rows if (r["Method"], r["Model"]) == ("memit", SMOLLM))
    assert memit["Edits"] == "150"
    assert float(memit["CounterFact Eff."]) == 78.0
    assert float(memit["CounterFact Eff. stderr"]) == 1.5
    assert memit["CounterFact Flu. stderr"] == "" and memit["CounterFact Flu. best"] == "*"
    assert "CounterFact Consis." not in memit
    assert float(memit["ZsRE Spe."]) == 27.0
    assert [r["Method"] for r in rows if r["CounterFact Eff. best"] == "*"] == ["lyaplock", "memit"]
    pre = next(r for r in rows if r["Method"] == "Pre-edited")
    assert pre["Edits"] == "0" and not any(v == "*" for k, v in pre.items() if k.endswith("best"))

    general = list(csv.DictReader(io.StringIO((out / "lb_general.csv").read_text())))
    memit = next(r for r in general if (r["Method"], r["Edit data"]) == ("memit", "counterfact")
                 and r["Model"] == SMOLLM)
    assert float(memit["edit_glue_sst2 f1_generation"]) == pytest.approx(0.61)
    assert float(memit["edit_glue_sst2 f1_generation change %"]) == pytest.approx(-4.6875)
    assert memit["gsm8k_edit exact_match [strict-match] change %"] == ""


def test_command_errors_name_the_problem(tmp_path, capsys):
    assert leaderboard.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        leaderboard.main([str(tmp_path), "--edits", "-5"])


# ---------------------------------------------------------------------------- reading runs


def test_trace_keeps_last_entry_per_batch_and_tolerates_truncated_tail(tmp_path):
    path = tmp_path / "trace.jsonl"
    lines = [{"batch": 0, "edits_done": 10, "edit_seconds": 1.0},
             {"batch": 1, "edits_done": 20, "edit_seconds": 9.0},
             {"batch": 1, "edits_done": 20, "edit_seconds": 2.0}]  # re-run after a resume
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"batch": 2, "edi')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = read_trace(path)
    assert [(t["batch"], t["edit_seconds"]) for t in trace] == [(0, 1.0), (1, 2.0)]
    assert "truncated" in str(caught[0].message)
    path.write_text('{"batch": 0\n{"batch": 1, "edits_done": 20}\n')
    with pytest.raises(RunDirError, match="trace.jsonl:1"):
        read_trace(path)


def test_general_metrics_use_reporting_groups_and_skip_editing_tasks():
    checkpoint = Checkpoint(0, Path("results.json"), {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.30, "acc_stderr,none": 0.01},
            "mmlu_stem": {"alias": " - stem", "acc,none": 0.28, "acc_stderr,none": 0.02},
            "mmlu_abstract_algebra": {"alias": "  - aa", "acc,none": 0.2},
            "edit_glue": {"alias": "edit_glue"},  # a group without an aggregate
            "edit_glue_rte": {"alias": " - rte", "f1_generation,none": 0.5,
                              "f1_generation_stderr,none": "N/A", "mcc,none": float("nan")},
            "counterfact_edit_scores": {"efficacy,none": 90.0},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_abstract_algebra"],
                           "edit_glue": ["edit_glue_rte"], "edit_glue_rte": []},
    })
    general = checkpoint.general()
    # "N/A" is unavailable (left out); a NaN is kept, as a value that is not finite (shown, not ranked)
    assert set(general) == {GeneralMetric("mmlu", "acc,none"),
                            GeneralMetric("edit_glue_rte", "f1_generation,none"),
                            GeneralMetric("edit_glue_rte", "mcc,none")}
    assert not general[GeneralMetric("edit_glue_rte", "mcc,none")].finite
    assert general[GeneralMetric("mmlu", "acc,none")].stderr == 0.01
    assert general[GeneralMetric("edit_glue_rte", "f1_generation,none")].stderr is None
    assert checkpoint.editing()["counterfact/efficacy"].mean == 90.0


def test_editing_metric_prefers_leaf_task_and_default_filter():
    checkpoint = Checkpoint(0, Path("results.json"), {
        "results": {
            "counterfact_edit": {"efficacy,none": 50.0},  # a group's aggregate
            "counterfact_edit_scores": {"efficacy,other": 10.0, "efficacy,none": 91.0,
                                        "efficacy_stderr,none": 1.0},
        },
        "group_subtasks": {"counterfact_edit": ["counterfact_edit_scores"]},
    })
    editing = checkpoint.editing()
    assert (editing["counterfact/efficacy"].mean, editing["counterfact/efficacy"].stderr) == \
        (91.0, 1.0)
    assert "counterfact/fluency" not in editing


def test_dataset_of_edit_data_specs():
    assert dataset_of("counterfact") == "counterfact"
    assert dataset_of("/data/multi_counterfact.json") == "counterfact"
    assert dataset_of("zsre") == "zsre"
    assert dataset_of("/data/zsre_mend_eval.json") == "zsre"
    assert dataset_of("/data/my_facts.jsonl") is None


def test_an_unreported_metric_gets_one_note_with_the_tasks_reason(fixture_runs):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs), 150)
    reason = NO_CONSISTENCY.removeprefix("unavailable, not reported: ")
    assert [n for n in board.notes if "Consis." in n] == [
        f"CounterFact Consis. not reported for memit, alphaedit, lyaplock: {reason}"]
    assert f"not reported for memit, alphaedit, lyaplock: {reason}" in leaderboard.leaderboard_markdown(board)


def test_unfinished_run_lists_what_is_missing(tmp_path):
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["methods"] = ["memit", "alphaedit"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "memit" / "checkpoints" / "edits_000100").mkdir()  # evaluation still running
    (run / "rome").mkdir()  # a method not in the manifest, edited but not yet evaluated
    (run / "rome" / "trace.jsonl").write_text(json.dumps(trace_entries("rome", 10)[0]) + "\n")
    [loaded] = load_runs([run])
    assert [m.method for m in loaded.methods] == ["memit", "rome"]
    assert list(loaded.methods[0].checkpoints) == [0, 50]
    assert loaded.methods[1].checkpoints == {} and len(loaded.methods[1].trace) == 1
    assert any("alphaedit has no results yet" in n for n in loaded.notes)
    board = leaderboard.build_leaderboard([loaded])
    assert board.edits == 50
    assert ("cf/rome: no evaluated checkpoint at 50 edits (has none); where nothing else fills its row, "
            "the row is left out") in board.notes
    assert [r.labels[0] for r in board.tables[0].rows] == ["Pre-edited", "memit"]


def test_a_lone_method_is_not_marked_best_and_titles_group_thousands(tmp_path):
    """A run with one method so far (a long run whose baselines have not started): nothing to rank
    it against, so no cell is bold, not even where it is far worse than the pre-edited model."""
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["lyaplock"], 2000, [0, 2000])
    board = leaderboard.build_leaderboard(load_runs([run]))
    assert all(not row.best for table in board.tables for row in table.rows)
    assert board.tables[0].title == "Editing performance after 2,000 edits"
    table_lines = [line for line in leaderboard.leaderboard_markdown(board).splitlines() if line.startswith("|")]
    assert table_lines and not any("**" in line for line in table_lines)


def test_a_nan_metric_is_shown_as_a_fault_named_in_the_notes_and_never_ranked(tmp_path):
    """json.dump writes a NaN efficacy as ``NaN``: before, it read as "not reported" (or, with an
    older reader, ranked as best); now the cell says NaN, a note names it, nothing ranks it."""
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit", "lyaplock"], 50, [0, 50])
    path = run / "memit" / "checkpoints" / "edits_000050" / "results.json"
    data = json.loads(path.read_text())
    data["results"]["counterfact_edit_scores"]["efficacy,none"] = float("nan")
    data["results"]["edit_glue_sst2"]["accuracy,none"] = float("inf")
    path.write_text(json.dumps(data))
    board = leaderboard.build_leaderboard(load_runs([run]))
    editing, general = board.tables
    memit, lyaplock = row_of(editing, "memit", SMOLLM), row_of(editing, "lyaplock", SMOLLM)
    eff = next(c for c in editing.columns if c.title == "CounterFact Eff.")
    assert texts(editing, memit)["CounterFact Eff."] == leaderboard.NOT_A_NUMBER
    assert eff.key not in memit.best and eff.key in lyaplock.best
    acc = next(c for c in general.columns if c.title == "edit_glue_sst2 accuracy")
    g_memit = row_of(general, "memit", SMOLLM, "counterfact")
    assert leaderboard.cell_text(general, g_memit, acc) == leaderboard.NOT_A_NUMBER
    assert acc.key not in g_memit.best and acc.key not in g_memit.change
    assert acc.key in row_of(general, "lyaplock", SMOLLM, "counterfact").best
    notes = [n for n in board.notes if "NaN/Inf" in n]
    assert notes == ["cf/memit at 50 edits: Eff., accuracy computed as NaN/Inf (a numerical fault in the "
                     f"run, or a metric undefined on these documents; shown as {leaderboard.NOT_A_NUMBER!r}, "
                     "not ranked)"]
    markdown = leaderboard.table_to_markdown(editing)
    assert f"| {leaderboard.NOT_A_NUMBER} |" in markdown and f"**{leaderboard.NOT_A_NUMBER}**" not in markdown
    html_page = leaderboard.leaderboard_html(board)
    assert f'<td class="num fault" title="the run computed NaN/Inf: not ranked">{leaderboard.NOT_A_NUMBER}</td>' in html_page
    record = next(r for r in csv.DictReader(io.StringIO(leaderboard.table_to_csv(editing)))
                  if r["Method"] == "memit")
    assert record["CounterFact Eff."] == "nan" and record["CounterFact Eff. best"] == ""

    from harness.runs import report

    plot = next(p for p in report.build_plots(load_runs([run])) if p.stem.endswith("editing_metrics"))
    ax = next(a for a in plot.figure.axes if a.get_title() == "CounterFact efficacy")
    crosses = [c for c in ax.collections if c.get_label() == "NaN/Inf (fault)"]
    assert len(crosses) == 1 and crosses[0].get_offsets()[:, 0].tolist() == [50.0]
    memit_line = next(line for line in ax.get_lines() if line.get_label() == "memit")
    assert memit_line.get_xdata().tolist() == [0]  # the NaN point is not drawn as a value


def test_trajectory_table_shows_earlier_points_side_by_side(fixture_runs, tmp_path):
    board = leaderboard.build_leaderboard(load_runs(fixture_runs), 150, trajectory=[50, 100, 3000])
    table = board.tables[1]
    assert table.name == "trajectory" and table.title == "Editing performance at 50, 100 edits"
    titles = [c.title for c in table.columns]
    assert titles[:4] == ["CounterFact Eff. @50", "CounterFact Eff. @100", "CounterFact Gen. @50",
                          "CounterFact Gen. @100"]
    assert "ZsRE Eff. @100" in titles and not any("Consis." in t for t in titles)
    memit = texts(table, row_of(table, "memit", SMOLLM))
    assert memit["CounterFact Eff. @50"] == "90.00 ± 1.50" and memit["CounterFact Eff. @100"] == "84.00 ± 1.50"
    # the headline point is not repeated, and a point no run reached is left out
    assert [t.name for t in leaderboard.build_leaderboard(load_runs(fixture_runs), 150, [150]).tables] == [
        "editing", "general"]
    out = tmp_path / "boards"
    assert leaderboard.main([str(fixture_runs[0]), "--at", "200", "--trajectory", "50,100", "--out", str(out)]) == 0
    markdown = (out / "leaderboard.md").read_text()
    assert "# Sequential editing leaderboard: 200 edits" in markdown
    assert "## Editing performance at 50, 100 edits" in markdown and (out / "leaderboard_trajectory.csv").exists()


def test_first_batch_retention_is_a_column_family_where_runs_report_it(tmp_path):
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit", "lyaplock"], 100, [0, 100])
    for method, kept in (("memit", 61.0), ("lyaplock", 88.0)):
        path = run / method / "checkpoints" / "edits_000100" / "results.json"
        results = json.loads(path.read_text())
        results["seqedit"] = {"retention": {"counterfact_edit_scores": {
            "first_batch": {"edits_since": 90, "scored": 10, "efficacy": kept, "efficacy_stderr": 4.0,
                            "generalization": kept - 10, "generalization_stderr": 5.0}}}}
        path.write_text(json.dumps(results))
    table = leaderboard.build_leaderboard(load_runs([run])).tables[0]
    titles = [c.title for c in table.columns]
    assert titles[-2:] == ["CounterFact Eff. 1st batch", "CounterFact Gen. 1st batch"]
    assert texts(table, row_of(table, "lyaplock", SMOLLM))["CounterFact Eff. 1st batch"] == "88.00 ± 4.00"
    column = next(c for c in table.columns if c.title == "CounterFact Eff. 1st batch")
    assert column.key in row_of(table, "lyaplock", SMOLLM).best
    # the pre-edited model has no first batch to retain: its cells stay empty
    assert texts(table, row_of(table, "Pre-edited", SMOLLM))["CounterFact Eff. 1st batch"] == "—"


def test_export_copies_results_without_edit_state_or_working_files(tmp_path, capsys):
    from harness.cli import main as seqedit

    run = write_run(tmp_path / "src", "cf", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    (run / "memit" / "state").mkdir()
    (run / "memit" / "state" / "edit_state.pt").write_bytes(b"x" * 100)
    (run / "memit" / ".lock").write_text("")
    partial = run / "memit" / "checkpoints" / "edits_000100" / "partial"
    partial.mkdir(parents=True)
    (partial / "edit_glue.json").write_text("{}")
    dest = tmp_path / "committed" / "cf"
    assert seqedit(["export", str(run), str(dest)]) == 0
    assert "exported 4 files" in capsys.readouterr().out
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["manifest.json", "memit/checkpoints/edits_000000/results.json",
                     "memit/checkpoints/edits_000050/results.json", "memit/trace.jsonl"]
    assert load_runs([dest])[0].methods[0].checkpoints.keys() == {0, 50}
    assert seqedit(["export", str(tmp_path), str(dest)]) == 2  # not a run directory: one line, exit 2

    # a sweep directory: every cell's results and the cells' configs, not its logs
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        cell = write_run(sweep, f"seed-{seed}", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
        (cell / "memit" / "state").mkdir()
        (cell / "memit" / "state" / "edit_state.pt").write_bytes(b"x")
    (sweep / "configs").mkdir()
    (sweep / "configs" / "seed-0.yaml").write_text("seed: 0\n")
    (sweep / "logs").mkdir()
    (sweep / "logs" / "seed-0.log").write_text("...")
    assert seqedit(["export", str(sweep), str(tmp_path / "committed" / "sweep")]) == 0
    files = sorted(str(p.relative_to(tmp_path / "committed" / "sweep"))
                   for p in (tmp_path / "committed" / "sweep").rglob("*") if p.is_file())
    assert files == ["configs/seed-0.yaml"] + [f"seed-{s}/{f}" for s in (0, 1) for f in (
        "manifest.json", "memit/checkpoints/edits_000000/results.json",
        "memit/checkpoints/edits_000050/results.json", "memit/trace.jsonl")]


def test_each_edit_glue_subset_shows_its_likelihood_accuracy_beside_the_pooled_metrics():
    checkpoint = Checkpoint(0, Path("results.json"), {
        "results": {
            "edit_glue": {"alias": "edit_glue", "acc_likelihood,none": 0.497, "acc_likelihood_stderr,none": 0.02},
            "edit_glue_sst2": {"alias": " - sst2", "acc_likelihood,none": 0.71, "acc_likelihood_stderr,none": 0.046,
                               "f1_generate,none": 0.39},
            "edit_glue_rte": {"alias": " - rte", "acc_likelihood,none": 0.49, "acc_likelihood_stderr,none": 0.05},
        },
        "group_subtasks": {"edit_glue": ["edit_glue_sst2", "edit_glue_rte"]},
    })
    general = checkpoint.general()
    assert set(general) == {GeneralMetric("edit_glue", "acc_likelihood,none"),
                            GeneralMetric("edit_glue_rte", "acc_likelihood,none"),
                            GeneralMetric("edit_glue_sst2", "acc_likelihood,none")}  # not sst2's f1_generate
    assert general[GeneralMetric("edit_glue_sst2", "acc_likelihood,none")].stderr == 0.046


def test_runs_that_differ_only_in_seed_show_their_mean_and_the_spread_across_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, efficacy in ((0, 90.0), (1, 94.0), (2, 98.0)):
        run = write_run(sweep, f"seed-{seed}", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"]["seed"] = seed
        (run / "manifest.json").write_text(json.dumps(manifest))
        path = run / "memit" / "checkpoints" / "edits_000050" / "results.json"
        data = json.loads(path.read_text())
        data["results"]["counterfact_edit_scores"]["efficacy,none"] = efficacy
        path.write_text(json.dumps(data))
    board = leaderboard.build_leaderboard(load_runs([sweep]))  # a sweep directory of cells
    table = board.tables[0]
    assert [r.labels[0] for r in table.rows] == ["Pre-edited", "memit"]
    # mean 94, standard deviation 4 across the seeds, standard error 4 / sqrt(3)
    assert texts(table, row_of(table, "memit", SMOLLM))["CounterFact Eff."] == "94.00 ± 2.31"
    assert "memit on SmolLM2-135M-Instruct: the mean over seeds 0, 1, 2, ± the standard error across them" \
        in board.notes
