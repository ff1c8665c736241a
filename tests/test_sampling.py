"""The stratified evaluation sample of long runs: which records a checkpoint scores, and the
estimates and retention rows made from them (harness/sampling.py)."""

import math

import numpy as np
import pytest

from harness.runs.sampling import edits_after, plan_sample, priorities, retention, stratified_mean


def test_plan_is_seeded_bounded_and_keeps_the_first_batch():
    plan = plan_sample(10_000, 500, 100, seed=0)
    assert plan.positions == plan_sample(10_000, 500, 100, seed=0).positions  # deterministic
    assert plan.positions != plan_sample(10_000, 500, 100, seed=1).positions
    assert len(plan.positions) == 500 and not plan.complete
    assert set(range(100)) <= set(plan.positions)
    # every tenth of the history holds its share of the other 400
    tenths = [s for s in plan.strata if s.name.startswith("tenth_")]
    assert [s.name for s in tenths] == [f"tenth_{k}" for k in range(1, 11)]
    for s in tenths:
        assert all(s.start <= p < s.stop and p >= 100 for p in s.scored)
        assert abs(len(s.scored) - 400 * s.size / 9_900) <= 1
    assert sum(s.size for s in plan.strata) == 10_000


def test_a_record_keeps_its_priority_as_the_run_grows():
    assert np.array_equal(priorities(1_000, 7)[:300], priorities(300, 7))
    before, after = plan_sample(9_000, 500, 100, 0), plan_sample(9_100, 500, 100, 0)
    assert len(set(before.positions) & set(after.positions)) > 450


@pytest.mark.parametrize("n, size, complete", [(300, 500, False), (10_000, None, False), (10_000, 500, True)])
def test_small_histories_the_final_checkpoint_and_no_budget_score_everything(n, size, complete):
    plan = plan_sample(n, size, 100, 0, complete=complete)
    assert plan.complete and plan.positions == list(range(n))


def test_fluency_plan_spreads_over_the_tenths_without_a_first_batch_stratum():
    plan = plan_sample(5_000, 100, 0, 0)
    assert [len(s.scored) for s in plan.strata] == [10] * 10
    assert "first_batch" not in [s.name for s in plan.strata]


def test_a_sample_smaller_than_the_first_batch_is_refused():
    with pytest.raises(ValueError, match="first batch"):
        plan_sample(1_000, 100, 100, 0)


def test_stratified_mean_estimates_the_mean_over_every_record():
    rng = np.random.default_rng(0)
    n = 4_000
    # an edit is kept less often the longer ago it was made, and the first batch is over-sampled
    truth = (rng.random(n) < np.linspace(0.3, 0.95, n)).astype(float)
    plan = plan_sample(n, 600, 100, seed=2)
    scored = {p: truth[p] for p in plan.positions}
    naive = float(np.mean(list(scored.values())))
    estimate, stderr = stratified_mean(scored, plan)
    assert abs(estimate - truth.mean()) < 3 * stderr < 0.1
    assert abs(naive - truth.mean()) > abs(estimate - truth.mean())  # the first batch pulls the plain mean down
    # scoring every record gives the plain mean; without a trend over the edit order the error is
    # close to lm-eval's mean_stderr (a trend is variance that the strata take out)
    everything = plan_sample(n, None, 100, 2)
    full, full_err = stratified_mean(dict(enumerate(truth)), everything)
    assert full == pytest.approx(truth.mean())
    flat = (rng.random(n) < 0.6).astype(float)
    flat_err = stratified_mean(dict(enumerate(flat)), everything)[1]
    assert flat_err == pytest.approx(flat.std(ddof=1) / math.sqrt(n), rel=0.03)
    assert full_err < truth.std(ddof=1) / math.sqrt(n)


def test_records_without_a_metric_are_left_out_of_their_stratum():
    plan = plan_sample(40, None, 4, 0)
    values = {p: 1.0 for p in range(40) if p % 2 == 0}
    assert stratified_mean(values, plan)[0] == pytest.approx(1.0)
    assert math.isnan(stratified_mean({}, plan)[0])


def test_retention_rows_follow_the_edit_order():
    plan = plan_sample(1_000, None, 100, 0)
    values = {p: 100.0 * (p >= 500) for p in range(1_000)}
    rows = retention({"efficacy": values}, plan, batch_size=100)
    assert rows["first_batch"]["edits_since"] == 900 and rows["first_batch"]["efficacy"] == 0.0
    assert rows["tenth_10"]["edits_since"] == 0 and rows["tenth_10"]["efficacy"] == 100.0
    assert rows["tenth_6"]["records"] == 100 and rows["tenth_6"]["scored"] == 100
    assert "tenth_1" not in rows  # the first tenth is the first batch here
    assert edits_after(150, 1_000, 100) == 800
