"""Edits that run away: a layer's per-batch update growing geometrically, caught from the trace
by the driver (a warning line at the batch) and by ``seqedit status``. The norms are those of
Gemma-3-270M's AlphaEdit cells (BENCHMARKS.md, "AlphaEdit's L2 on Gemma")."""

from __future__ import annotations

from types import SimpleNamespace

from harness.runs.runaway import runaway_layers

# layer 1 and 2 update norms of the first batches at L2 = 10 (the model broke), 100 (it held)
AT_L2_10 = [(59.8, 36.4), (125.1, 55.0), (289.9, 73.4), (605.4, 96.3), (1178.0, 134.1)]
AT_L2_100 = [(18.0, 9.3), (18.4, 9.0), (24.9, 9.7), (26.0, 9.9)]


def trace_of(norms, batch_size=100):
    return [{"edits_done": batch_size * (i + 1), "batch_size": batch_size,
             "layers": {"1": {"update_norm": a, "preservation_loss": 1.0}, "2": {"update_norm": b}}}
            for i, (a, b) in enumerate(norms)]


def test_a_layer_growing_geometrically_is_found_and_a_holding_one_is_not():
    # three batches give two growths: not yet enough to tell
    assert runaway_layers(trace_of(AT_L2_10[:3])) == []
    (found,) = runaway_layers(trace_of(AT_L2_10[:4]))
    assert (found.layer, found.edits, found.norms) == ("1", 400, (59.8, 125.1, 289.9, 605.4))
    assert "grew 2.2-fold per batch over the last 3 batches" in found.describe()
    assert "at 400 edits" in found.describe()
    # layer 2 grew 1.3-1.5-fold per batch: slower than the bar
    assert [r.layer for r in runaway_layers(trace_of(AT_L2_10))] == ["1"]
    assert runaway_layers(trace_of(AT_L2_100)) == []
    # one batch that did not grow ends the streak; a missing or non-finite norm is not read as one
    assert runaway_layers(trace_of(AT_L2_10[:3] + [(300.0, 1.0), (700.0, 1.0)])) == []
    broken = trace_of(AT_L2_10[:4])
    broken[1]["layers"]["1"]["update_norm"] = float("nan")
    assert runaway_layers(broken) == []
    # records without per-layer figures (a trace line of another kind) are passed over
    assert [r.layer for r in runaway_layers([{"edits_done": 0}] + trace_of(AT_L2_10[:4]))] == ["1"]


def test_the_driver_warns_once_per_layer_at_the_batch_where_it_shows(tmp_path):
    from harness.runs.config import RunConfig
    from harness.runs.driver import MethodProgress, SequentialRun

    run = SequentialRun(RunConfig(methods=["alphaedit"], output_dir=str(tmp_path)), progress=False)
    written = []
    run.bar = SimpleNamespace(write=written.append)
    progress = MethodProgress(lm=SimpleNamespace(trace=[]), stream=[])
    warned_at = []
    for record in trace_of(AT_L2_10):
        progress.lm.trace.append(record)
        before = len(written)
        run.warn_runaway("alphaedit", progress)
        warned_at += [record["edits_done"]] * (len(written) - before)
    assert warned_at == [400]
    assert written[0].startswith("[alphaedit] warning: layer 1's update grew 2.2-fold per batch")


def test_status_warns_about_an_unfinished_method_whose_edits_run_away(tmp_path):
    from harness.runs.config import RunConfig
    from harness.runs.status import method_status, render

    cfg = RunConfig(methods=["alphaedit"], num_edits=2000, edit_batch_size=100, eval_every=500)
    # the two fields of a MethodRun that a method without checkpoints shows
    found = SimpleNamespace(trace=trace_of(AT_L2_10), checkpoints={})
    status = method_status("gemma", "alphaedit", tmp_path / "alphaedit", cfg, found)
    assert status.state == "stopped" and len(status.warnings) == 1
    assert "warning: gemma/alphaedit: layer 1's update grew" in render([status])
    held = method_status("gemma", "alphaedit", tmp_path / "alphaedit", cfg,
                         SimpleNamespace(trace=trace_of(AT_L2_100), checkpoints={}))
    assert held.warnings == [] and "warning" not in render([held])
