"""Seconds per edit (total and per phase) and peak memory of each editor on the embedded SmolLM2.

    python bench/edit_speed.py                      # every editor and add-on, 3 batches of 10 edits
    python bench/edit_speed.py --methods lyaplock --batches 5 --batch_size 10

Phases: statistics (one-off key second moments, cached on disk after the first run: reported
separately), targets (target-value optimisation), keys (keys and residuals per layer), solve
(closed-form update of each layer), write (the final weights written, the preservation loss,
the editor's state and trace). Peak memory is the maximum resident set
size while that editor ran (the window is reset per editor where Linux allows it, else the
process's maximum so far); "growth" is the RSS increase from the first to the last batch, which stays
flat when an editor's memory does not grow with the number of edits.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from harness.data import load_edit_data
from harness.editors import EDITORS, editor_class
from harness.editors.hparams import load_hparams
from harness.editors.lyaplock import BASES as LYAPLOCK_BASES
from harness.loading import load_model
from harness.runs.environment import proc_status_mb


def rss_mb() -> float:
    rss = proc_status_mb("VmRSS")
    return float("nan") if rss is None else rss


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM), so that each
    editor's peak is its own and not the process's maximum over the editors before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join([*EDITORS, *(f"lyaplock-{b}" for b in LYAPLOCK_BASES if b != "memit")]),
                   help="comma-separated editors; lyaplock-<base> is LyapLock wrapped around <base>")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--edit_data", default="counterfact")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    requests = load_edit_data(args.edit_data, limit=args.batches * args.batch_size)
    model, tok = load_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    print(f"torch threads: {torch.get_num_threads()}  batches: {args.batches} x {args.batch_size} edits")
    print(f"{'method':<20}{'s/edit':>8}{'targets':>9}{'keys':>8}{'solve':>8}{'write':>8}{'stats s':>9}{'peak MB':>9}{'growth MB':>10}")
    for method in args.methods.split(","):
        model.load_state_dict(original)
        per_method_peak = reset_peak()
        base, _, addon = method.partition("-")
        hp = load_hparams(base, model_name="smollm2-135m", overrides={"base": addon} if addon else None)
        editor = editor_class(base)(model, tok, hp, progress=False)
        t0 = time.perf_counter()
        editor.prepare()
        prep = time.perf_counter() - t0
        phases = {"targets": 0.0, "keys": 0.0, "solve": 0.0, "write": 0.0}
        total, rss = 0.0, []
        for b in range(args.batches):
            rec = editor.apply_batch(requests[b * args.batch_size:(b + 1) * args.batch_size])
            total += rec["edit_seconds"]
            for k, v in rec["phase_seconds"].items():
                phases[k] = phases.get(k, 0.0) + v
            rss.append(rss_mb())
        n = args.batches * args.batch_size
        peak = peak_mb()
        row = {"method": editor.name, "s_per_edit": total / n, **{k: v / n for k, v in phases.items()},
               "prepare_s": prep, "peak_rss_mb": peak, "peak_is_per_method": per_method_peak,
               "rss_growth_mb": rss[-1] - rss[0]}
        rows.append(row)
        print(f"{row['method']:<20}{row['s_per_edit']:>8.2f}{row['targets']:>9.2f}{row['keys']:>8.2f}"
              f"{row['solve']:>8.2f}{row['write']:>8.2f}{prep:>9.1f}{peak:>9.0f}{row['rss_growth_mb']:>10.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
