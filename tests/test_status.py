"""``seqedit status`` on a real run directory of a tiny model, in the states a long run passes
through: a method not started, one whose process is editing, one stopped, one complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_driver import TINY, tiny_dir  # noqa: F401 (the fixture, for this module too)


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):  # noqa: F811
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    out = tmp_path_factory.mktemp("sweep") / "cell-a"
    cfg = RunConfig(model=str(tiny_dir), methods=["memit", "lyaplock"], num_edits=4, eval_every=2,
                    edit_batch_size=2, tasks=["counterfact_edit_scores"], seed=3,
                    cache_dir=str(out.parent / "cache"), device="cpu",
                    hparams={"memit": "smollm2-135m", "lyaplock": "smollm2-135m"},
                    overrides={"memit": TINY, "lyaplock": TINY}, output_dir=str(out))
    SequentialRun(cfg, progress=False, only=["memit"]).run()  # lyaplock is left for "another process"
    return out


def _by_method(statuses):
    return {s.method: s for s in statuses}


def test_status_follows_a_run_from_complete_back_to_stopped_and_running(run_dir):
    from harness.runs.status import collect

    statuses = _by_method(collect(run_dir))
    memit, lyaplock = statuses["memit"], statuses["lyaplock"]
    assert (memit.state, memit.edits_traced, memit.checkpoints_done) == ("complete", 4, [0, 2, 4])
    assert memit.hours_left is None and memit.seconds_per_edit > 0
    scores = json.loads((run_dir / "memit/checkpoints/edits_000004/results.json").read_text())
    scores = scores["results"]["counterfact_edit_scores"]
    assert memit.latest == "4: " + " ".join(
        f"{m[:3]} {scores[m + ',none']:.1f}" for m in ("efficacy", "generalization", "specificity"))
    assert (lyaplock.state, lyaplock.edits_traced, lyaplock.latest) == ("not started", 0, "")

    # the last checkpoint lost (a run killed while scoring it): what is left is that evaluation,
    # which scores all 4 edited records, twice the 2 that the one at 2 edits scored in its time
    (run_dir / "memit/checkpoints/edits_000004/results.json").unlink()
    memit = _by_method(collect(run_dir))["memit"]
    assert (memit.state, memit.checkpoints_done) == ("stopped", [0, 2])
    assert memit.latest.startswith("2: eff ")
    at_two = json.loads((run_dir / "memit/checkpoints/edits_000002/results.json").read_text())
    assert memit.hours_left * 3600 == pytest.approx(2 * at_two["seqedit"]["evaluation_seconds"]["counterfact_edit_scores"])

    # the lock file names the process editing the method; a dead one's id means nothing
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "memit/.lock").write_text(f"{holder.pid}\n")
        assert _by_method(collect(run_dir))["memit"].state == f"running (pid {holder.pid})"
    finally:
        holder.kill()
        holder.wait()
    assert _by_method(collect(run_dir))["memit"].state == "stopped"


def test_status_command_reads_a_sweep_directory(run_dir, capsys):
    from harness.cli import main
    from harness.errors import UserError

    assert main(["status", str(run_dir.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "state", "edits"]
    rows = {line.split()[1]: line for line in lines[1:3]}
    assert rows["memit"].startswith("cell-a") and "4/4" in rows["memit"]
    assert rows["lyaplock"].startswith("cell-a") and "not started" in rows["lyaplock"]
    with pytest.raises(UserError, match="no such directory"):
        from harness.runs.status import main as status_main

        status_main([str(run_dir / "nope")])
