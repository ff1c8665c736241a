"""Edits that run away: a layer whose per-batch update keeps growing by a large factor.

A batched editor's update for one batch has about the same size from batch to batch while the model
holds (SmolLM2's AlphaEdit: never more than 1.11-fold from one batch to the next over 10,000
edits). When each update feeds the next, it grows geometrically, and the model breaks within a few
batches more: Gemma-3-270M's AlphaEdit at L2 = 10 went 60, 125, 290, 605 on layer 1 and its
perplexity from 44 to 82,422 in three batches. The trace records every batch's update norm, so
the driver can say so at the batch where it shows, long before a checkpoint measures it. Over
the project's traces it fires on Gemma's two breakdowns (that AlphaEdit, and LyapLock at lambda
1000), both at 400 edits, and on none of the committed runs. It is not a general alarm: a model
can break under updates of steady size (MEMIT on ZsRE, perplexity 1.7 million at 1,000 edits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# three growths in a row of at least 1.5 (3.4-fold in all): Gemma's collapsing AlphaEdit (L2 = 10)
# grew 2.1-2.3 per batch; LyapLock's Gemma cell, which held, and AlphaEdit at the L2 = 100 it now
# takes grew at most 1.35 in a batch over their 2,000 edits (BENCHMARKS.md, "AlphaEdit's L2 on Gemma")
GROWTH_FACTOR = 1.5
GROWTHS = 3


@dataclass(frozen=True)
class Runaway:
    layer: str
    norms: tuple[float, ...]  # the per-batch update norms of the last GROWTHS + 1 batches
    edits: int  # edits done after the last of them

    def describe(self) -> str:
        per_batch = (self.norms[-1] / self.norms[0]) ** (1 / (len(self.norms) - 1))
        shown = ", ".join(f"{n:,.0f}" if n >= 10 else f"{n:.2g}" for n in self.norms)
        return (f"layer {self.layer}'s update grew {per_batch:.1f}-fold per batch over the last "
                f"{len(self.norms) - 1} batches (norm {shown}, at {self.edits:,} edits): the edits are "
                "running away and the model is likely breaking; the next checkpoint's perplexity "
                "will tell, and a stronger regularisation in the hyper-parameters may be needed")


def runaway_layers(trace: list[dict], factor: float = GROWTH_FACTOR, growths: int = GROWTHS) -> list[Runaway]:
    """The layers whose update norm grew by at least ``factor`` in each of the last ``growths``
    batches of ``trace`` (the driver's per-batch records, oldest first)."""
    batches = [r for r in trace if isinstance(r.get("layers"), dict)][-(growths + 1):]
    if len(batches) < growths + 1:
        return []
    found = []
    for layer in batches[-1]["layers"]:
        norms = [(b["layers"].get(layer) or {}).get("update_norm") for b in batches]
        if not all(isinstance(n, (int, float)) and math.isfinite(n) and n > 0 for n in norms):
            continue
        if all(later >= factor * earlier for earlier, later in zip(norms, norms[1:])):
            found.append(Runaway(str(layer), tuple(float(n) for n in norms), int(batches[-1].get("edits_done", 0))))
    return found
