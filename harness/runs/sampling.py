"""Which edited records a checkpoint scores, and what the scores say about all of them.

A long run cannot score every edited record at every checkpoint: after 10,000 edits that is hours
of fluency sampling per checkpoint. A checkpoint scores a stratified sample instead, whose size
does not grow with the run:

* the strata follow the edit order: the first batch, then each tenth of the history (the tenth
  that holds the first batch keeps only its other records);
* the first batch is always scored whole (the records that have lived longest with later edits);
  the rest of the budget is shared over the tenths in proportion to their sizes;
* within a stratum the records scored are those with the smallest priority, a seeded uniform
  number fixed per position in the edit stream, so that a record scored at one checkpoint tends
  to be scored at the next one too and the curves are not redrawn from scratch each time;
* the final checkpoint of a run scores every edited record.

Because the first batch is over-represented, the plain mean of the scored records is not the mean
over the edited records: ``stratified_mean`` weighs each stratum by its size and gives the standard
error of that estimate. The error treats the edited records as draws from the edit stream (no
finite-population correction), as lm-eval's ``mean_stderr`` does: at a checkpoint that scores every
record it is about lm-eval's figure, and at a sampled one it grows by the sampling noise. ``retention`` gives each stratum's own mean against the edits made after it: the
forgetting curve of sequential editing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

TENTHS = 10
FIRST_BATCH = "first_batch"
# the metrics whose retention rows a checkpoint keeps: did the edit, and its paraphrases, survive
RETENTION_METRICS = ("efficacy", "generalization")


@dataclass(frozen=True)
class Stratum:
    name: str  # "first_batch" or "tenth_1" ... "tenth_10"
    start: int  # positions in the edit order, [start, stop)
    stop: int
    scored: tuple[int, ...]  # positions of the records scored, ascending
    carved: int = 0  # first-batch records inside [start, stop): they belong to the first-batch stratum

    @property
    def size(self) -> int:
        return self.stop - self.start - self.carved


@dataclass(frozen=True)
class SamplePlan:
    n_records: int  # records edited so far (or, before any edit, the records the run will edit)
    first_batch: int
    strata: tuple[Stratum, ...]

    @property
    def positions(self) -> list[int]:
        return sorted(p for s in self.strata for p in s.scored)

    @property
    def complete(self) -> bool:
        return len(self.positions) == self.n_records

    def to_dict(self) -> dict:
        return {"records": self.n_records, "scored": len(self.positions), "complete": self.complete,
                "first_batch": self.first_batch,
                "strata": [{"name": s.name, "start": s.start, "stop": s.stop, "size": s.size,
                            "scored": len(s.scored)} for s in self.strata]}


def priorities(n: int, seed: int) -> np.ndarray:
    """Seeded uniform numbers, one per position; the first m of ``priorities(n)`` are
    ``priorities(m)``, so a position keeps its number as the run grows."""
    return np.random.default_rng([int(seed), 0x5A3E]).random(n)


def _bounds(n_records: int, first_batch: int) -> list[tuple[str, int, int, int]]:
    """(name, start, stop, first-batch records inside) of every non-empty stratum."""
    out = []
    if first_batch:
        out.append((FIRST_BATCH, 0, min(first_batch, n_records), 0))
    for k in range(TENTHS):
        start, stop = k * n_records // TENTHS, (k + 1) * n_records // TENTHS
        carved = max(0, min(stop, first_batch) - start)
        if stop - start - carved > 0:
            out.append((f"tenth_{k + 1}", start, stop, carved))
    return out


def plan_sample(n_records: int, size: int | None, first_batch: int, seed: int,
                complete: bool = False) -> SamplePlan:
    """The records to score among ``n_records`` edited in order, ``size`` at most (None or
    ``complete``: every record). ``first_batch`` records at the start are always scored (0: no
    such stratum)."""
    first_batch = max(0, min(int(first_batch), n_records))
    bounds = _bounds(n_records, first_batch)
    everything = complete or size is None or size >= n_records
    if not everything and size <= first_batch:
        raise ValueError(f"a sample of {size} records cannot hold the first batch ({first_batch}) and "
                         "any other record")
    prio = priorities(n_records, seed)
    rest = [(name, a, b, carved) for name, a, b, carved in bounds if name != FIRST_BATCH]
    rest_total = sum(b - a - carved for _, a, b, carved in rest)
    budget = 0 if everything else size - first_batch
    # largest-remainder allocation in proportion to the strata's sizes
    quotas = {}
    if rest and not everything:
        exact = {name: budget * (b - a - c) / rest_total for name, a, b, c in rest}
        quotas = {name: math.floor(x) for name, x in exact.items()}
        leftover = budget - sum(quotas.values())
        for name in sorted(exact, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True):
            if leftover <= 0:
                break
            quotas[name] += 1
            leftover -= 1
    strata = []
    for name, a, b, carved in bounds:
        members = np.arange(a if name == FIRST_BATCH else max(a, first_batch), b)
        if everything or name == FIRST_BATCH:
            chosen = members
        else:
            take = min(len(members), quotas[name])
            chosen = np.sort(members[np.argsort(prio[members], kind="stable")[:take]])
        strata.append(Stratum(name, a, b, tuple(int(p) for p in chosen), carved))
    return SamplePlan(n_records, first_batch, tuple(strata))


def _stratum_values(values: Mapping[int, float], stratum: Stratum) -> list[float]:
    return [float(values[p]) for p in stratum.scored if p in values and values[p] is not None]


def stratified_mean(values: Mapping[int, float], plan: SamplePlan) -> tuple[float, float]:
    """The mean over every record of the plan estimated from the scored ones (position ->
    value; a record without the metric is left out of its stratum), and its standard error."""
    total = sum(s.size for s in plan.strata if _stratum_values(values, s))
    if not total:
        return math.nan, math.nan
    mean = var = 0.0
    for s in plan.strata:
        got = _stratum_values(values, s)
        if not got:
            continue
        weight = s.size / total
        mean += weight * float(np.mean(got))
        if len(got) > 1:
            var += weight ** 2 * float(np.var(got, ddof=1)) / len(got)
    return mean, math.sqrt(var)


def edits_after(position: int, n_records: int, batch_size: int) -> int:
    """Edits applied after the batch that holds ``position``."""
    return max(0, n_records - (position // batch_size + 1) * batch_size)


def retention(metrics: Mapping[str, Mapping[int, float]], plan: SamplePlan, batch_size: int) -> dict:
    """Per stratum: its records' mean edits-since-applied, how many were scored, and the mean and
    standard error of each metric over them."""
    out = {}
    for s in plan.strata:
        if not s.scored:
            continue
        row = {"start": s.start, "stop": s.stop, "records": s.size, "scored": len(s.scored),
               "edits_since": float(np.mean([edits_after(p, plan.n_records, batch_size) for p in s.scored]))}
        for name, values in metrics.items():
            got = _stratum_values(values, s)
            if got:
                row[name] = float(np.mean(got))
                row[f"{name}_stderr"] = float(np.std(got, ddof=1) / math.sqrt(len(got))) if len(got) > 1 else math.nan
        out[s.name] = row
    return out
