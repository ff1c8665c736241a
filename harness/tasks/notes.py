"""Notes the editing tasks leave in their results for readers of a run directory.

Kept apart from :mod:`harness.tasks.edit_metrics` so that a reader (the leaderboard, the report)
can recognise them without importing lm-eval.
"""

# an editing task that cannot compute a metric says why in its config metadata, under the
# metric's name, starting with this
UNAVAILABLE_NOTE = "unavailable, not reported: "
