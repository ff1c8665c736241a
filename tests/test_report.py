"""The report: plots from run directories and the HTML page embedding them.

Runs are the leaderboard tests' fixtures (the sequential driver's format with known numbers).
The page is opened in headless Chromium; without Chromium the browser tests fail under CI and
are skipped elsewhere with the install command.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_leaderboard import BATCH, LAYERS, SMOLLM, write_run

from harness.runs import report
from harness.runs.resultsdir import load_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# what a page's own problems look like in Chromium's stderr log (not its dbus/gpu chatter)
CONSOLE_PROBLEM = re.compile(r"CONSOLE|Uncaught|Failed to load")
# appended to a copy of the page: reports every image that did not decode, counts the rest
IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !i.complete || i.naturalWidth === 0);
  broken.forEach((i) => console.error("image did not load: " + i.getAttribute("src")));
  document.body.setAttribute("data-images-loaded", String(images.length - broken.length));
});
</script>"""


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [
        write_run(root, "smollm2_counterfact", SMOLLM, "counterfact", ["memit", "lyaplock"], 200,
                  [0, 50, 100, 150, 200]),
        write_run(root, "smollm2_zsre", SMOLLM, "zsre", ["memit", "lyaplock"], 150,
                  [0, 50, 100, 150]),
    ]


@pytest.fixture(scope="session")
def written(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    page, plots = report.write_report(load_runs(runs), out)
    return out, page, plots


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])


def links_of(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


# ---------------------------------------------------------------------------- figures


def test_one_figure_of_each_kind(written):
    _, _, plots = written
    assert [p.stem for p in plots] == [
        "smollm2-135m-instruct_editing_metrics",
        "smollm2-135m-instruct_preservation_loss",
        "smollm2-135m-instruct_lyaplock_queue",
        "smollm2-135m-instruct_edit_seconds",
        "smollm2-135m-instruct_general_capability",
    ]


def test_every_figure_has_title_axis_labels_and_legend(written):
    _, _, plots = written
    for plot in plots:
        assert plot.figure._suptitle.get_text(), plot.stem
        assert plot.figure.legends, f"{plot.stem}: no legend"
        for ax in (a for a in plot.figure.axes if a.get_visible()):
            assert ax.get_title(), plot.stem
            assert ax.get_xlabel() == "number of edits", plot.stem
            assert ax.get_ylabel(), plot.stem
    by_kind = {p.stem.split("_", 1)[1]: p for p in plots}
    assert {a.get_ylabel() for a in by_kind["edit_seconds"].figure.axes} == {"seconds per batch"}
    assert {a.get_ylabel() for a in by_kind["preservation_loss"].figure.axes} == {
        "preservation loss D_t (mean squared output change)"}


def visible_axes(plot):
    return [a for a in plot.figure.axes if a.get_visible()]


def line(ax, label):
    [found] = [x for x in ax.get_lines() if x.get_label() == label]
    return found


def test_editing_panels_one_line_per_method_with_the_run_numbers(written):
    _, _, plots = written
    editing = visible_axes(plots[0])
    assert [a.get_title() for a in editing] == [
        "CounterFact efficacy", "CounterFact generalization", "CounterFact specificity",
        "CounterFact fluency", "ZsRE efficacy", "ZsRE generalization", "ZsRE specificity",
    ]  # no consistency panel: no run reports it
    cf_eff, zsre_eff = editing[0], editing[4]
    lyap = line(cf_eff, "lyaplock (counterfact)")
    assert list(lyap.get_xdata()) == [0, 50, 100, 150, 200]
    assert list(lyap.get_ydata()) == [21.0, 98.5, 98.0, 97.5, 97.0]
    # the ZsRE task inside the CounterFact run scores CounterFact records: not drawn as ZsRE
    assert sorted(x.get_label() for x in zsre_eff.get_lines()) == ["lyaplock (zsre)", "memit (zsre)"]
    assert list(line(zsre_eff, "memit (zsre)").get_ydata()) == [35.0, 89.0, 84.0, 79.0]
    # one colour per method, a line style per run of it
    memit_cf = line(editing[1], "memit (counterfact)")
    memit_zsre = line(editing[5], "memit (zsre)")
    assert memit_cf.get_color() == memit_zsre.get_color()
    assert memit_cf.get_linestyle() != memit_zsre.get_linestyle()


def test_editing_caption_warns_that_fluency_does_not_see_incoherence_only_where_fluency_is_drawn(
        written, tmp_path):
    _, page, plots = written
    warning = "CounterFact fluency: it falls when text repeats itself, not when it loses its sense"
    assert "CounterFact fluency" in [a.get_title() for a in visible_axes(plots[0])]
    assert warning in plots[0].caption and html.escape(warning) in page.read_text(encoding="utf-8")
    zsre_only = write_run(tmp_path, "zsre_only", SMOLLM, "zsre", ["memit"], 2 * BATCH, [0, 2 * BATCH])
    plot = report.editing_figure(SMOLLM, report.build_series(load_runs([zsre_only])))
    assert "CounterFact fluency" not in [a.get_title() for a in visible_axes(plot)]
    assert warning not in plot.caption


def test_preservation_loss_per_layer_with_dashed_thresholds_and_log_axis(written, runs):
    _, _, plots = written
    panels = visible_axes(plots[1])
    assert [a.get_title() for a in panels] == ["layer 4", "layer 5", "layer 6"]
    for ax in panels:
        thresholds = [x for x in ax.get_lines() if x.get_label() == report.THRESHOLD_LABEL]
        assert sorted(x.get_gid() for x in thresholds) == [
            "lyaplock (counterfact) threshold", "lyaplock (zsre) threshold"]
        assert all(x.get_linestyle() == "--" for x in thresholds)
        # two thresholds in one panel: each is labelled with its run
        assert sorted(t.get_text() for t in ax.texts) == ["lyaplock (counterfact)", "lyaplock (zsre)"]
        assert all(x.get_linestyle() != "--" for x in ax.get_lines() if x not in thresholds)
        assert ax.get_yscale() == "log"  # memit grows 400-fold over 20 batches
    # the caption says when each line crossed the threshold: (b + 1)^2 > 60 from batch 7 (80 edits)
    assert f"memit (counterfact) first passes it after {8 * BATCH} edits (layer {LAYERS[0]})" in plots[1].caption
    memit = line(panels[0], "memit (counterfact)")
    assert list(memit.get_xdata())[:3] == [10, 20, 30]
    assert list(memit.get_ydata())[:3] == pytest.approx([1e-4, 4e-4, 9e-4])
    # less than two decades stays linear: LyapLock alone is held near its threshold
    series = [s for s in report.build_series(load_runs(runs[:1])) if s.run.method == "lyaplock"]
    alone = report.preservation_figure(SMOLLM, series)
    assert {a.get_yscale() for a in visible_axes(alone)} == {"linear"}
    assert not any(a.texts for a in visible_axes(alone))  # one threshold needs no name
    # thresholds of different methods are told apart by colour: no names piled on them
    both = [s for s in report.build_series(load_runs(runs)) if s.run.method == "lyaplock"][:2]
    both[1] = dataclasses.replace(both[1], color="tab:orange")
    assert not any(a.texts for a in visible_axes(report.preservation_figure(SMOLLM, both)))


def test_a_run_one_batch_long_is_drawn_as_a_point(tmp_path):
    """A sweep cell that has just started has one batch in its trace: its loss, its threshold and
    its queue are drawn as markers (a line through one point draws nothing); longer runs as lines."""
    started = write_run(tmp_path, "alpha-4", SMOLLM, "counterfact", ["lyaplock"], BATCH, [0, BATCH])
    longer = write_run(tmp_path, "alpha-2", SMOLLM, "counterfact", ["lyaplock"], 5 * BATCH, [0, 5 * BATCH])
    series = report.build_series(load_runs([started, longer]))
    for figure in (report.preservation_figure(SMOLLM, series), report.queue_figure(SMOLLM, series)):
        for ax in visible_axes(figure):
            drawn = {(x.get_gid() or x.get_label()): x for x in ax.get_lines()}
            assert drawn
            for name, x in drawn.items():
                one_point = len(x.get_xdata()) == 1
                assert one_point == ("alpha-4" in name), name
                assert (x.get_marker() == "o") == one_point, name


def test_one_queue_figure_compares_the_lyaplock_runs_per_layer(written):
    _, _, plots = written
    queue = visible_axes(plots[2])
    assert [a.get_title() for a in queue] == [f"layer {layer}" for layer in LAYERS]
    assert sorted(x.get_label() for x in queue[0].get_lines()) == ["lyaplock (counterfact)", "lyaplock (zsre)"]
    q_layer4 = line(queue[0], "lyaplock (counterfact)")
    assert min(q_layer4.get_ydata()) == 1.0  # q never drops below 1
    assert q_layer4.get_ydata()[-1] > 1.0  # and grows once the loss passes the threshold


def legend_labels(plot) -> list[str]:
    return [t.get_text() for t in plot.figure.legends[0].get_texts()]


def test_legends_name_each_method_once_grouped_with_one_entry_per_run_style(written, tmp_path):
    _, _, plots = written
    editing = legend_labels(plots[0])
    assert editing == ["Baselines", "memit", "LyapLock and add-ons", "lyaplock", "Runs", "counterfact", "zsre"]
    preservation = legend_labels(plots[1])
    assert preservation[-1] == report.THRESHOLD_LABEL and preservation.count(report.THRESHOLD_LABEL) == 1
    # a method's colour is the same in every report, whichever methods it shows
    alone = write_run(tmp_path, "alone", SMOLLM, "counterfact", ["lyaplock"], 50, [0, 50])
    (only,) = report.build_series(load_runs([alone]))
    both = {s.run.method: s.color for s in report.build_series(load_runs([alone.parent / "alone"]))}
    assert only.color == both["lyaplock"] == report.METHOD_COLORS["lyaplock"]


def test_twelve_methods_get_twelve_colours(tmp_path):
    methods = ["memit", "alphaedit", "lyaplock", "lyaplock-alphaedit", "lyaplock-prune",
               "lyaplock-rect", "prune", "rect", "rlsedit", "encore", "ft", "rome"]
    run = tmp_path / "all"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "config": {"methods": methods, "edit_data": "zsre", "num_edits": BATCH},
        "model_name": SMOLLM}))
    for method in methods:
        (run / method).mkdir()
        (run / method / "trace.jsonl").write_text(json.dumps(
            {"method": method, "batch": 0, "edits_done": BATCH, "edit_seconds": 1.0}) + "\n")
    series = report.build_series(load_runs([run]))
    assert len(series) == 12 and len({s.color for s in series}) == 12
    # baselines first, then the LyapLock family
    assert [s.run.method for s in series] == ["memit", "alphaedit", "prune", "rect", "rlsedit", "encore", "ft",
                                              "rome", "lyaplock", "lyaplock-alphaedit", "lyaplock-prune",
                                              "lyaplock-rect"]


def test_runs_of_one_method_on_one_dataset_are_named_by_their_run_directory(tmp_path):
    """A sweep over LyapLock's alpha: three runs of one method on the same edit data are told
    apart by their cells' names; with other edit data beside them the data comes first."""
    cells = [write_run(tmp_path / "alpha", f"alpha-{a}", SMOLLM, "counterfact", ["lyaplock"], 2 * BATCH,
                       [0, 2 * BATCH]) for a in (2, 4, 8)]
    labels = [s.label for s in report.build_series(load_runs(cells))]
    assert labels == ["lyaplock (alpha-2)", "lyaplock (alpha-4)", "lyaplock (alpha-8)"]
    other = write_run(tmp_path, "zsre_run", SMOLLM, "zsre", ["lyaplock"], 2 * BATCH, [0, 2 * BATCH])
    labels = sorted(s.label for s in report.build_series(load_runs([*cells, other])))
    assert labels == ["lyaplock (counterfact, alpha-2)", "lyaplock (counterfact, alpha-4)",
                      "lyaplock (counterfact, alpha-8)", "lyaplock (zsre)"]
    assert {report._split_label(label)[0] for label in labels} == {"lyaplock"}


def test_queue_caption_says_when_q_rose_and_how_close_the_loss_came(written, tmp_path):
    _, page, plots = written
    # the fixture's LyapLock loss is scale*(batch+1)^2 against 60*scale, capped at 1.3x: the
    # queue first rises after batch 8 (64 > 60), every layer at once
    caption = plots[2].caption
    assert "Highest preservation loss: 1.30 × the threshold" in caption
    assert f"q first rose above 1 after {8 * BATCH} edits (layer {LAYERS[0]})" in caption
    assert html.escape(caption) in page.read_text(encoding="utf-8")

    short = write_run(tmp_path, "short", SMOLLM, "zsre", ["lyaplock"], 5 * BATCH, [0, 5 * BATCH])
    (lyaplock,) = [s for s in report.build_series(load_runs([short])) if s.run.method == "lyaplock"]
    caption = report.queue_figure(SMOLLM, [lyaplock]).caption
    assert f"Highest preservation loss: {25 / 60:.2f} × the threshold" in caption
    assert "q stayed at 1 throughout" in caption


# ---------------------------------------------------------------------------- the page


def test_page_images_exist_and_are_figures(written):
    out, page, plots = written
    links = links_of(page)
    assert len(links.images) == len(plots)
    for src in links.images:
        assert not src.startswith(("/", "file:", "http")), src  # relative paths only
        assert (out / src).read_bytes().startswith(PNG_MAGIC), src
    svgs = [h for h in links.links if h.endswith(".svg")]
    assert len(svgs) == len(plots)
    for href in svgs:
        assert "<svg" in (out / href).read_text(encoding="utf-8")[:2000], href


def test_page_has_leaderboard_tables_and_manifest_summary(written):
    _, page, _ = written
    text = page.read_text(encoding="utf-8")
    assert '<section class="table" id="editing">' in text
    assert '<section class="table" id="general">' in text
    assert "Editing performance after 150 edits" in text
    assert "<strong>97.50 ± 1.50</strong>" in text  # lyaplock's CounterFact efficacy, best
    runs_section = text[text.index('<section id="runs">'):text.index("</section>")]
    for expected in ("SmolLM2-135M-Instruct (smollm2)", "memit, lyaplock", "counterfact", "zsre",
                     "<td>10</td>", "<td>0</td>", "f00dfeedcafe<", "lm_eval 0.4.13",
                     "torch 2.5.1", "2025-11-22T05:00:00Z"):
        assert expected in runs_section, expected
    assert "<script" not in text


def test_command_and_its_errors(tmp_path, capsys):
    run = write_run(tmp_path, "cf", SMOLLM, "counterfact", ["memit"], 100, [0, 50, 100])
    out = tmp_path / "rep"
    assert report.main([str(run), "--out", str(out), "--edits", "50"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "Editing performance after 50 edits" in text
    assert len(list((out / "figures").glob("*.png"))) == len(list((out / "figures").glob("*.svg")))
    assert report.main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_page_without_a_common_checkpoint_still_has_the_figures(tmp_path):
    a = write_run(tmp_path, "a", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    b = write_run(tmp_path, "b", SMOLLM, "zsre", ["memit"], 100, [0, 100])
    page, plots = report.write_report(load_runs([a, b]), tmp_path / "rep")
    text = page.read_text(encoding="utf-8")
    assert "pass --edits N" in text
    assert len(links_of(page).images) == len(plots) > 0


# ---------------------------------------------------------------------------- in a browser


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    message = ("headless Chromium is needed to open the report: install it with "
               "`apt-get install chromium` (Debian/Ubuntu)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def open_in_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        *mode, page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def page_problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_PROBLEM.search(line)]


def with_image_check(page: Path) -> Path:
    """A copy of the page, next to it so relative paths resolve, that reports broken images."""
    checked = page.with_name(f"{page.stem}.imagecheck.html")
    checked.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", IMAGE_CHECK_SCRIPT + "\n</body>"), encoding="utf-8")
    return checked


def test_report_opens_in_headless_chromium(written, tmp_path):
    _, page, plots = written
    shown = open_in_chromium(page, tmp_path / "profile", "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert page_problems(shown.stderr) == []
    assert shown.stdout.count("<img ") == len(plots)
    assert 'id="editing"' in shown.stdout and "97.50 ± 1.50" in shown.stdout

    checked = open_in_chromium(with_image_check(page), tmp_path / "profile", "--dump-dom")
    assert checked.returncode == 0
    assert page_problems(checked.stderr) == []
    assert f'data-images-loaded="{len(plots)}"' in checked.stdout

    shot = tmp_path / "report.png"
    taken = open_in_chromium(page, tmp_path / "profile", f"--screenshot={shot}",
                             "--window-size=1400,2400", "--hide-scrollbars")
    assert taken.returncode == 0
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_browser_check_catches_broken_pages(tmp_path):
    """The checks above must be able to fail: a missing image and a script error are caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="figures/missing.png">'
                    "<script>undefinedFunction()</script></body></html>")
    shown = open_in_chromium(with_image_check(page), tmp_path / "profile", "--dump-dom")
    problems = page_problems(shown.stderr)
    assert any("Uncaught" in p and "undefinedFunction" in p for p in problems), shown.stderr
    assert any("image did not load: figures/missing.png" in p for p in problems)
    assert 'data-images-loaded="0"' in shown.stdout


def test_prune_runs_get_a_restraint_figure_saying_when_it_acted(tmp_path):
    run = tmp_path / "prune_run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "config": {"methods": ["memit", "prune", "lyaplock-prune"], "edit_data": "counterfact",
                   "num_edits": 4 * BATCH},
        "model_name": SMOLLM}))
    for method in ("memit", "prune", "lyaplock-prune"):
        (run / method).mkdir()
        lines = []
        for b in range(4):
            layers = {str(layer): {"preservation_loss": 1.0 + b} for layer in LAYERS}
            if method != "memit":  # the last layer passes its bound of 3 after the third batch
                for k, layer in enumerate(LAYERS):
                    grows = k == len(LAYERS) - 1
                    layers[str(layer)].update(update_sigma_max=(1.0 + b) if grows else 0.5,
                                              sigma_max_W0=3.0 - 0.1 * grows)
            lines.append(json.dumps({"method": method, "batch": b, "edits_done": (b + 1) * BATCH,
                                     "edit_seconds": 1.0, "layers": layers}))
        (run / method / "trace.jsonl").write_text("\n".join(lines) + "\n")
    series = report.build_series(load_runs([run]))
    figures = {s.run.method: report.restraint_figure(s) for s in series}
    assert figures["memit"] is None
    plot = figures["prune"]
    assert f"first acted after {3 * BATCH} edits (layer {LAYERS[-1]})" in plot.caption
    assert f"1 of {len(LAYERS)} layers passed the bound" in plot.caption
    ax = visible_axes(plot)[-1]
    assert [ln.get_label() for ln in ax.get_lines()] == ["largest singular value of W - W0 (raw)", "bound σ_max(W0)"]
    assert ax.get_lines()[1].get_linestyle() == "--"
    assert "prune_restraint" in plot.stem
    assert plot.title == f"PRUNE restraint: {plot.model}"
    assert "accumulate as plain MEMIT" in plot.caption
    add_on = figures["lyaplock-prune"]  # the add-on's edits are LyapLock's, restrained the same way
    assert add_on.title == f"PRUNE restraint in lyaplock-prune: {add_on.model}"
    assert "accumulate as plain LyapLock" in add_on.caption


def test_retention_figure_follows_the_first_batch_and_profiles_the_last_checkpoint(tmp_path):
    run = write_run(tmp_path, "long", SMOLLM, "counterfact", ["memit", "lyaplock"], 200, [0, 100, 200])
    for method, fade in (("memit", 20.0), ("lyaplock", 5.0)):
        for edits in (100, 200):
            path = run / method / "checkpoints" / f"edits_{edits:06d}" / "results.json"
            results = json.loads(path.read_text())
            rows = {"first_batch": {"edits_since": edits - BATCH, "scored": BATCH,
                                    "efficacy": 100.0 - fade * edits / 100, "generalization": 80.0}}
            for k in range(1, 11):
                rows[f"tenth_{k}"] = {"edits_since": edits * (10 - k) / 10, "scored": 3,
                                      "efficacy": 100.0 - fade * (10 - k) / 10}
            results["seqedit"] = {"retention": {"counterfact_edit_scores": rows}}
            path.write_text(json.dumps(results))
    plots = {p.stem: p for p in report.build_plots(load_runs([run]))}
    plot = plots["smollm2-135m-instruct_retention"]
    axes = visible_axes(plot)
    assert [a.get_title() for a in axes] == ["CounterFact efficacy", "CounterFact generalization"]
    assert axes[0].get_xlabel() == report.EDITS_SINCE_AXIS
    memit = line(axes[0], "memit")
    assert list(memit.get_xdata()) == [100 - BATCH, 200 - BATCH] and list(memit.get_ydata()) == [80.0, 60.0]
    profiles = [x for x in axes[0].get_lines() if x.get_linestyle() == ":"]
    assert len(profiles) == 2 and list(profiles[0].get_xdata())[0] == 180.0  # the oldest tenth, at 200 edits
    assert "first batch" in plot.caption


def test_capability_figure_draws_perplexity_and_the_subsets_above_chance(tmp_path):
    run = write_run(tmp_path, "cap", SMOLLM, "counterfact", ["memit", "lyaplock"], 100, [0, 50, 100])
    for method, rise in (("memit", 10.0), ("lyaplock", 1.0)):
        for edits in (0, 50, 100):
            path = run / method / "checkpoints" / f"edits_{edits:06d}" / "results.json"
            results = json.loads(path.read_text())
            results["results"]["wikitext_edit"] = {"word_perplexity,none": 75.0 + rise * edits / 50,
                                                   "word_perplexity_stderr,none": "N/A"}
            # sst2 sits 4.6 stderr over its chance of 1/2, mmlu at its chance of 1/4
            results["results"]["edit_glue_sst2"] = {"acc_likelihood,none": 0.71 - 0.001 * edits,
                                                    "acc_likelihood_stderr,none": 0.046}
            results["results"]["edit_glue_mmlu"] = {"acc_likelihood,none": 0.25, "acc_likelihood_stderr,none": 0.044}
            # one solved problem of fifty, with lm-eval's stderr: the general figure must show the noise
            results["results"]["gsm8k_edit"] = {"exact_match,flexible-extract": 0.02 if edits < 100 else 0.0,
                                                "exact_match_stderr,flexible-extract": 0.02 if edits < 100 else 0.0}
            results["configs"] = {"edit_glue_sst2": {"doc_to_choice": ["negative", "positive"]},
                                  "edit_glue_mmlu": {"doc_to_choice": ["A", "B", "C", "D"]}}
            path.write_text(json.dumps(results))
    plots = {p.stem.split("_", 1)[1]: p for p in report.build_plots(load_runs([run]))}
    plot = plots["capability"]
    axes = visible_axes(plot)
    assert [a.get_title() for a in axes] == ["wikitext_edit", "edit_glue_sst2"]
    assert list(line(axes[0], "memit").get_ydata()) == [75.0, 85.0, 95.0]
    assert axes[0].get_yscale() == "linear" and "log axis" not in plot.caption
    assert line(axes[1], "chance (0.5)").get_linestyle() == ":"
    assert "At chance before editing, so not drawn: mmlu (z = 0.0)." in plot.caption
    # the general figure keeps the rest and leaves out what the capability figure draws
    general = [a.get_title() for a in visible_axes(plots["general_capability"])]
    assert "gsm8k_edit" in general and not any(t.startswith(("edit_glue_sst2", "wikitext")) for t in general)
    gsm8k = next(a for a in visible_axes(plots["general_capability"]) if a.get_title() == "gsm8k_edit")
    band = gsm8k.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(0.04) and band.min() == pytest.approx(0.0)
    assert "standard error" in plots["general_capability"].caption

    # once one run's perplexity has risen more than tenfold, a linear axis would flatten the others
    path = run / "memit" / "checkpoints" / "edits_000100" / "results.json"
    results = json.loads(path.read_text())
    results["results"]["wikitext_edit"]["word_perplexity,none"] = 1200.0
    path.write_text(json.dumps(results))
    plot = next(p for p in report.build_plots(load_runs([run])) if p.stem.split("_", 1)[1] == "capability")
    assert visible_axes(plot)[0].get_yscale() == "log" and "log axis" in plot.caption
    plot.figure.canvas.draw()
    labels = [t.get_text() for t in visible_axes(plot)[0].get_yticklabels() if t.get_visible() and t.get_text()]
    assert {"100", "200", "500", "1000"} <= set(labels)
    assert visible_axes(plot)[1].get_yscale() == "linear"


def overlapping_texts(plot) -> list[str]:
    """The figure's title against its legend, as drawn: a one-panel figure is narrow, and its
    title is centred over the legend's column too."""
    figure = plot.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    return [plot.stem for legend in figure.legends if title.overlaps(legend.get_window_extent(renderer))]


def test_no_title_runs_into_its_legend(written, tmp_path):
    _, _, plots = written
    run = write_run(tmp_path, "ppl", SMOLLM, "zsre", ["memit", "lyaplock"], 100, [0, 50, 100])
    for method in ("memit", "lyaplock"):
        for edits in (0, 50, 100):
            path = run / method / "checkpoints" / f"edits_{edits:06d}" / "results.json"
            results = json.loads(path.read_text())
            results["results"]["wikitext_edit"] = {"word_perplexity,none": 75.0 * (1 + edits),
                                                   "word_perplexity_stderr,none": "N/A"}
            path.write_text(json.dumps(results))
    one_panel = [p for p in report.build_plots(load_runs([run])) if p.stem.endswith("_capability")]
    assert len(visible_axes(one_panel[0])) == 1
    assert [stem for plot in [*plots, *one_panel] for stem in overlapping_texts(plot)] == []


def test_a_rewritten_report_leaves_no_stale_figures(tmp_path):
    both = write_run(tmp_path, "both", SMOLLM, "counterfact", ["memit", "lyaplock"], 50, [0, 50])
    alone = write_run(tmp_path, "alone", SMOLLM, "counterfact", ["memit"], 50, [0, 50])
    out = tmp_path / "rep"
    report.write_report(load_runs([both]), out)
    assert (out / "figures" / "smollm2-135m-instruct_lyaplock_queue.png").exists()
    _, plots = report.write_report(load_runs([alone]), out)
    on_disk = {p.name for p in (out / "figures").iterdir()}
    assert on_disk == {f"{p.stem}.{ext}" for p in plots for ext in ("png", "svg")}
