"""The run layer: sequential runs, sweeps of runs, and what is read back from their directories.

* :mod:`~harness.runs.config`: the run config and its command-line form;
* :mod:`~harness.runs.driver`: one run in named steps (plan, restore, apply a batch, save the
  edit state, evaluate a checkpoint);
* :mod:`~harness.runs.evaluation` and :mod:`~harness.runs.sampling`: a checkpoint's lm-eval
  calls, on a stratified sample of the edited records;
* :mod:`~harness.runs.storage` and :mod:`~harness.runs.environment`: crash-safe files, and what
  a run records about where it ran;
* :mod:`~harness.runs.sweep`: grids of runs through local processes, Slurm (submitit) or Ray;
* :mod:`~harness.runs.resultsdir`, :mod:`~harness.runs.leaderboard`, :mod:`~harness.runs.report`:
  run directories read back, as tables and as figures.

Imports point one way: this layer uses the editors, the lm-eval models and the tasks; none of
them imports it (``tests/test_layers.py``).
"""
