"""``seqedit``: sequential runs, leaderboards, reports, and where the bundled files are."""

from __future__ import annotations

import sys

USAGE = """usage: seqedit <command> [options]

commands:
  run          sequential editing run with lm-eval checkpoints (seqedit run --help)
  sweep        a grid of runs, one run directory per cell (seqedit sweep --help)
  leaderboard  tables from run directories (seqedit leaderboard --help)
  report       plots + HTML report from run directories (seqedit report --help)
  status       where a run or sweep stands: edits, checkpoints, scores, time left (seqedit status --help)
  export       copy a run directory's results without its edit states (seqedit export --help)
  paths        print the embedded model file, task directory and bundled data
  hub-cache    put a hub dataset (e.g. nyu-mll/glue) into the datasets cache from local files,
               for lm-eval's own tasks without the Hub (seqedit hub-cache --help)
"""


def _paths() -> int:
    from harness import tasks_dir
    from harness.data.edits import SAMPLE_FILES
    from harness.loading import default_model_path

    gguf = default_model_path()
    print(f"default model (gguf): {gguf}")
    print(f"  lm_eval --model hf --model_args pretrained={gguf}")
    print(f"tasks directory: {tasks_dir()}")
    for name, path in SAMPLE_FILES.items():
        print(f"bundled {name} sample: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from harness.errors import UserError, debug_enabled

    try:
        return _dispatch(argv[0], argv[1:])
    except UserError as exc:  # a mistake the message tells how to fix: one line, no traceback
        if debug_enabled() or "--debug" in argv:
            raise
        print(f"seqedit {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(command: str, rest: list[str]) -> int:
    if command == "run":
        from harness.runs.driver import main as run_main

        return run_main(rest)
    if command == "sweep":
        from harness.runs.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "leaderboard":
        from harness.runs.leaderboard import main as lb_main

        return lb_main(rest)
    if command == "report":
        from harness.runs.report import main as report_main

        return report_main(rest)
    if command == "status":
        from harness.runs.status import main as status_main

        return status_main(rest)
    if command == "export":
        from harness.runs.resultsdir import export_main

        return export_main(rest)
    if command == "paths":
        return _paths()
    if command == "hub-cache":
        from harness.hub_datasets import main as hub_cache_main

        return hub_cache_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
