"""The closed-form editor updates against direct least-squares solutions on small problems."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.editors.queue import LyapunovQueue, resolve_scale
from harness.editors.solvers import (
    EditMemory,
    RLSState,
    alphaedit_delta,
    encore_delta,
    lyaplock_delta,
    memit_delta,
    nullspace_projector,
    preservation_loss,
    preservation_loss_from_moments,
    prune_restrain,
    prune_restrain_with_spectrum,
    rect_sparsify,
    rome_update,
    spectral_norm,
)

D_IN, D_OUT, N = 16, 8, 4
F64 = torch.float64


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def generic_keys(gen, n_tokens=200):
    """Sample keys K0 and their mean second moment C0 = K0 K0^T / N (so K0/sqrt(N) factors C0)."""
    K0 = rand(gen, D_IN, n_tokens)
    return K0, K0 @ K0.T / n_tokens


def solve_rows(blocks):
    """argmin_X sum_j ||X A_j - B_j||_F^2 for blocks [(A_j, B_j)], by stacked least squares."""
    A = torch.cat([a for a, _ in blocks], dim=1)
    B = torch.cat([b for _, b in blocks], dim=1)
    return torch.linalg.lstsq(A.T, B.T).solution.T


def assert_close(actual, expected, tol=1e-6):
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.to(F64) - expected.to(F64)).abs().max())
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.0e} * {scale:.3g}"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------- MEMIT / ENCORE


@pytest.mark.parametrize("with_prev", [False, True])
def test_memit_is_the_ridge_least_squares_solution(gen, with_prev):
    K0, C0 = generic_keys(gen)
    K, R, Kp = rand(gen, D_IN, N), rand(gen, D_OUT, N), rand(gen, D_IN, 6)
    lam = 3.0
    blocks = [
        (K, R),
        (math.sqrt(lam) * K0 / math.sqrt(K0.shape[1]), torch.zeros(D_OUT, K0.shape[1])),
    ]
    if with_prev:
        blocks.append((Kp, torch.zeros(D_OUT, Kp.shape[1], dtype=F64)))
    expected = solve_rows(blocks)
    actual = memit_delta(R, K, C0, lam, prev_KKt=Kp @ Kp.T if with_prev else None)
    assert actual.shape == (D_OUT, D_IN)
    assert_close(actual, expected)


def test_memit_keeps_callers_dtype_and_matches_float64(gen):
    _, C0 = generic_keys(gen)
    K, R = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    exact = memit_delta(R, K, C0, 2.0)
    single = memit_delta(R.float(), K.float(), C0.float(), 2.0)
    assert exact.dtype == F64 and single.dtype == torch.float32
    assert_close(single, exact, tol=1e-5)


def test_encore_adds_the_frobenius_penalty_and_shrinks_the_update(gen):
    K0, C0 = generic_keys(gen)
    K, R, Kp = rand(gen, D_IN, N), rand(gen, D_OUT, N), rand(gen, D_IN, 5)
    lam, mu = 2.0, 4.0
    expected = solve_rows(
        [
            (K, R),
            (math.sqrt(lam) * K0 / math.sqrt(K0.shape[1]), torch.zeros(D_OUT, K0.shape[1])),
            (Kp, torch.zeros(D_OUT, Kp.shape[1], dtype=F64)),
            (math.sqrt(mu) * torch.eye(D_IN, dtype=F64), torch.zeros(D_OUT, D_IN, dtype=F64)),
        ]
    )
    with_mu = encore_delta(R, K, C0, lam, mu, prev_KKt=Kp @ Kp.T)
    assert_close(with_mu, expected)
    without_mu = memit_delta(R, K, C0, lam, prev_KKt=Kp @ Kp.T)
    assert torch.linalg.norm(with_mu) < torch.linalg.norm(without_mu) - 1e-6
    assert_close(encore_delta(R, K, C0, lam, 0.0, prev_KKt=Kp @ Kp.T), without_mu, tol=1e-12)


def test_indefinite_system_raises_a_message_naming_the_fix(gen):
    _, C0 = generic_keys(gen)
    K, R = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    with pytest.raises(ValueError, match="not positive definite.*mom2_update_weight"):
        memit_delta(R, K, C0, -5.0)
    with pytest.raises(ValueError, match=r"\(d_out, n\).*\(d_in, n\)"):
        memit_delta(R.T, K, C0, 1.0)


# ---------------------------------------------------------------------------- AlphaEdit


def covariance_with_null_space(gen, n_null=7):
    """C0 = Q diag(eig) Q^T with n_null eigenvalues below AlphaEdit's 2e-2 threshold."""
    Q, _ = torch.linalg.qr(rand(gen, D_IN, D_IN))
    big = 0.5 + torch.rand(D_IN - n_null, generator=gen, dtype=F64) * 3
    small = torch.rand(n_null, generator=gen, dtype=F64) * 1e-3
    eig = torch.cat([big, small])
    return Q @ torch.diag(eig) @ Q.T, Q, eig


def test_nullspace_projector_selects_the_small_eigenvectors(gen):
    Q, _ = torch.linalg.qr(rand(gen, D_IN, D_IN))
    # straddle the 2e-2 threshold closely so that a wrong cut-off changes the subspace
    eig = torch.tensor(
        [3.0, 1.0, 0.5, 0.2, 0.08, 0.05, 0.03, 0.021]
        + [0.019, 0.015, 0.01, 5e-3, 1e-3, 1e-4, 1e-6, 0.0],
        dtype=F64,
    )
    C0 = Q @ torch.diag(eig) @ Q.T
    P = nullspace_projector(C0)
    U_null = Q[:, eig < 2e-2]
    assert_close(P, U_null @ U_null.T, tol=1e-10)
    assert_close(P @ P, P, tol=1e-10)
    assert round(float(torch.trace(P))) == 8
    assert nullspace_projector(C0.float()).dtype == torch.float32
    # the reference's SVD selection picks the same subspace
    U, s, _ = torch.linalg.svd(C0)
    assert_close(P, U[:, s < 2e-2] @ U[:, s < 2e-2].T, tol=1e-10)


def test_alphaedit_leaves_generic_key_directions_untouched(gen):
    C0, Q, eig = covariance_with_null_space(gen)
    P = nullspace_projector(C0)
    K, R, Kp = rand(gen, D_IN, N), rand(gen, D_OUT, N), rand(gen, D_IN, 5)
    delta = alphaedit_delta(R, K, P, prev_KKt=Kp @ Kp.T, l2=10.0)
    assert float(torch.linalg.norm(delta)) > 1e-3
    preserved = Q[:, eig >= 2e-2]  # eigenvectors of C0 with large eigenvalues
    assert float((delta @ preserved).abs().max()) < 1e-12


def test_alphaedit_is_the_projected_least_squares_solution(gen):
    C0, Q, eig = covariance_with_null_space(gen)
    P = nullspace_projector(C0)
    U = Q[:, eig < 2e-2]  # orthonormal basis of the null space: Delta = X U^T
    K, R, Kp = rand(gen, D_IN, N), rand(gen, D_OUT, N), rand(gen, D_IN, 5)
    l2 = 0.7
    X = solve_rows(
        [
            (U.T @ K, R),
            (U.T @ Kp, torch.zeros(D_OUT, Kp.shape[1], dtype=F64)),
            (
                math.sqrt(l2) * torch.eye(U.shape[1], dtype=F64),
                torch.zeros(D_OUT, U.shape[1], dtype=F64),
            ),
        ]
    )
    assert_close(alphaedit_delta(R, K, P, prev_KKt=Kp @ Kp.T, l2=l2), X @ U.T)


def test_alphaedit_fits_the_edits_when_l2_is_small(gen):
    C0, _, _ = covariance_with_null_space(gen, n_null=7)
    P = nullspace_projector(C0)
    K, R = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    assert_close(alphaedit_delta(R, K, P, l2=1e-9) @ K, R, tol=1e-6)
    # with a large l2 the edit is far from fitted: the test above is not vacuous
    assert float((alphaedit_delta(R, K, P, l2=100.0) @ K - R).abs().max()) > 0.1


# ---------------------------------------------------------------------------- distortion D


def test_preservation_loss_is_the_mean_output_change_on_generic_keys(gen):
    K0, C0 = generic_keys(gen, n_tokens=300)
    W0 = rand(gen, D_OUT, D_IN)
    W = W0 + 0.1 * rand(gen, D_OUT, D_IN)
    direct = float(torch.linalg.norm(W @ K0 - W0 @ K0) ** 2) / K0.shape[1]
    assert preservation_loss(W, W0, C0) == pytest.approx(direct, rel=1e-10)
    assert preservation_loss(W0, W0, C0) == 0.0


def test_three_term_distortion_matches_samples_and_difference_form(gen):
    K0, C0 = generic_keys(gen, n_tokens=300)
    N0 = K0.shape[1]
    W0, W = rand(gen, D_OUT, D_IN), rand(gen, D_OUT, D_IN)
    V0 = W0 @ K0 + 0.3 * rand(gen, D_OUT, N0)  # outputs that W0 does not reproduce exactly
    direct = float(torch.linalg.norm(W @ K0 - V0) ** 2) / N0
    moments = preservation_loss_from_moments(W, C0, V0 @ K0.T / N0, float((V0 * V0).sum()) / N0)
    assert moments == pytest.approx(direct, rel=1e-10)
    V0 = W0 @ K0
    moments = preservation_loss_from_moments(W, C0, V0 @ K0.T / N0, float((V0 * V0).sum()) / N0)
    assert moments == pytest.approx(preservation_loss(W, W0, C0), rel=1e-9)


# ---------------------------------------------------------------------------- LyapLock


def lyaplock_objective_minimiser(K, R, W, W0, K0, lam, q, V, Kp, Vp):
    n0 = K0.shape[1]
    G = K0 / math.sqrt(n0)  # C0 = G G^T
    blocks = [
        (math.sqrt(V) * K, math.sqrt(V) * (W @ K + R)),
        (math.sqrt(q * lam) * G, math.sqrt(q * lam) * (W0 @ G)),
    ]
    if Kp is not None:
        blocks.append((math.sqrt(V) * Kp, math.sqrt(V) * Vp))
    return solve_rows(blocks)


def test_lyaplock_step_is_the_exact_minimiser(gen):
    K0, C0 = generic_keys(gen)
    W0 = rand(gen, D_OUT, D_IN)
    W = W0 + 0.2 * rand(gen, D_OUT, D_IN)  # weights after earlier batches
    K, R = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    Kp, Vp = rand(gen, D_IN, 6), rand(gen, D_OUT, 6)  # earlier edits and their stored values
    lam, q, V = 5.0, 2.7, 1.6
    delta = lyaplock_delta(R, K, W, W0, C0, lam, q, V, S_VK=Vp @ Kp.T, S_KK=Kp @ Kp.T)
    expected = lyaplock_objective_minimiser(K, R, W, W0, K0, lam, q, V, Kp, Vp)
    assert_close(W + delta, expected)
    # without memory
    delta = lyaplock_delta(R, K, W, W0, C0, lam, q, V)
    assert_close(W + delta, lyaplock_objective_minimiser(K, R, W, W0, K0, lam, q, V, None, None))


def test_lyaplock_first_batch_is_memit_with_the_same_lambda(gen):
    _, C0 = generic_keys(gen)
    W0 = rand(gen, D_OUT, D_IN)
    K, R = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    assert_close(lyaplock_delta(R, K, W0, W0, C0, 7.0, 1.0), memit_delta(R, K, C0, 7.0), 1e-10)


def test_lyaplock_with_edit_memory_keeps_earlier_edits(gen):
    """Two batches through EditMemory: the second solve is the joint minimiser."""
    K0, C0 = generic_keys(gen)
    W0 = rand(gen, D_OUT, D_IN)
    lam = 4.0
    memory = EditMemory()
    K1, R1 = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    W1 = W0 + lyaplock_delta(R1, K1, W0, W0, C0, lam, 1.0)
    memory.add(K1, W1)
    K2, R2 = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    W2 = W1 + lyaplock_delta(R2, K2, W1, W0, C0, lam, 3.0, 1.0, S_VK=memory.S_VK, S_KK=memory.S_KK)
    expected = lyaplock_objective_minimiser(K2, R2, W1, W0, K0, lam, 3.0, 1.0, K1, W1 @ K1)
    assert_close(W2, expected)


def test_edit_memory_accumulates_and_round_trips(gen):
    memory = EditMemory()
    batches = [(rand(gen, D_IN, 3), rand(gen, D_OUT, D_IN)) for _ in range(3)]
    for K, W in batches:
        memory.add(K.float(), W)
    assert memory.S_KK.dtype == F64 and memory.n_edits == 9
    S_KK = sum(K.float().double() @ K.float().double().T for K, _ in batches)
    S_VK = sum((W @ K.float().double()) @ K.float().double().T for K, W in batches)
    assert_close(memory.S_KK, S_KK, 1e-12)
    assert_close(memory.S_VK, S_VK, 1e-12)
    restored = EditMemory()
    restored.load_state_dict(memory.state_dict())
    assert restored.n_edits == 9
    assert torch.equal(restored.S_KK, memory.S_KK) and torch.equal(restored.S_VK, memory.S_VK)
    with pytest.raises(ValueError, match="pass W_new"):
        memory.add(batches[0][0])
    keys_only = EditMemory(track_values=False)
    keys_only.add(batches[0][0])
    assert keys_only.S_VK is None and keys_only.S_KK.shape == (D_IN, D_IN)


# ---------------------------------------------------------------------------- Lyapunov queue


def test_queue_follows_the_hand_computed_recursion():
    # alpha = 4, D_base = 1: threshold 4, sqrt 2, a = 1/2, Z0 = floor = 2.
    queue = LyapunovQueue(alpha=4.0)
    assert queue.q == 1.0 and queue.edit_weight == 1.0 and not queue.started
    expected = [
        # D_t, Z after,                         q = Z / 2
        (1.0, 2.0, 1.0),  # max(2 + 0.5 * (1 - 4), 2) = max(0.5, 2) = 2
        (10.0, 5.0, 2.5),  # 2 + 0.5 * (10 - 4) = 5
        (8.0, 7.0, 3.5),  # 5 + 0.5 * (8 - 4) = 7
        (0.0, 5.0, 2.5),  # 7 + 0.5 * (0 - 4) = 5
        (0.0, 3.0, 1.5),  # 5 - 2 = 3
        (0.0, 2.0, 1.0),  # max(3 - 2, 2) = 2: the floor holds
    ]
    for D_t, Z, q in expected:
        assert queue.observe(D_t) == pytest.approx(q, abs=1e-12)
        assert queue.Z == pytest.approx(Z, abs=1e-12)
    assert queue.D_base == 1.0 and queue.threshold == 4.0 and queue.a == 0.5
    assert queue.Z_floor == 2.0 and queue.steps == 6


def test_queue_other_spellings_offset_and_numbers():
    # alpha = 2, D_base = 3: threshold 6; a = '1_D' = 1/6, Z0 = 'D' = 6, floor = 0.5 sqrt(6).
    queue = LyapunovQueue(alpha=2.0, b=0.25, z0="D", a="1_D", z_floor="0.5sqrtD")
    queue.observe(3.0)  # Z = 6 + (3 - 6)/6 + 0.25 = 5.75
    assert queue.Z == pytest.approx(5.75)
    assert queue.q == pytest.approx(5.75 / 6)
    assert queue.Z_floor == pytest.approx(0.5 * math.sqrt(6))
    queue.observe(12.0)  # Z = 5.75 + (12 - 6)/6 + 0.25 = 7.0
    assert queue.q == pytest.approx(7.0 / 6)
    numeric = LyapunovQueue(alpha=10.0, V=2.0, z0=3.0, a="0.1", z_floor=1.0)
    numeric.observe(0.5)  # threshold 5: Z = max(3 + 0.1 * (0.5 - 5), 1) = 2.55
    assert numeric.Z == pytest.approx(2.55) and numeric.q == pytest.approx(0.255)
    assert numeric.edit_weight == 2.0
    assert resolve_scale("2_sqrtD", 16.0) == pytest.approx(0.5)
    assert resolve_scale("sqrtD", 16.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="sqrtD"):
        LyapunovQueue(z0="sqrt(D)")
    with pytest.raises(ValueError, match="must be > 0"):
        LyapunovQueue().observe(0.0)


def test_queue_state_is_json_and_resumes_identically():
    run = LyapunovQueue(alpha=3.0)
    for D_t in (2.0, 9.0, 4.0):
        run.observe(D_t)
    resumed = LyapunovQueue.from_state_dict(json.loads(json.dumps(run.state_dict())))
    for D_t in (11.0, 1.0):
        assert resumed.observe(D_t) == run.observe(D_t)
    assert resumed.state_dict() == run.state_dict()


# ---------------------------------------------------------------------------- ROME


def test_rome_is_rank_one_and_writes_the_value(gen):
    _, C0 = generic_keys(gen)
    W = rand(gen, D_OUT, D_IN)
    k_star, k_clean, v_star = rand(gen, D_IN), rand(gen, D_IN), rand(gen, D_OUT)
    delta = rome_update(W, C0, k_star, k_clean, v_star)
    assert torch.linalg.matrix_rank(delta) == 1
    assert_close((W + delta) @ k_clean, v_star, 1e-10)
    # the row space is C0^-1 k*: C0 applied to it is parallel to k*
    row = torch.linalg.svd(delta).Vh[0]
    cosine = torch.dot(C0 @ row, k_star) / (torch.linalg.norm(C0 @ row) * torch.linalg.norm(k_star))
    assert abs(float(cosine)) == pytest.approx(1.0, abs=1e-10)
    # a recorded output (module with a bias) replaces W k_clean
    bias = rand(gen, D_OUT)
    delta_b = rome_update(W, C0, k_star, k_clean, v_star, w_k_clean=W @ k_clean + bias)
    assert_close((W + delta_b) @ k_clean + bias, v_star, 1e-10)


def test_rome_is_the_minimum_covariance_norm_edit(gen):
    """With k_clean = k*: min tr(D C0 D^T) s.t. D k* = v* - W k*, solved row-wise by KKT."""
    _, C0 = generic_keys(gen)
    W, k, v = rand(gen, D_OUT, D_IN), rand(gen, D_IN), rand(gen, D_OUT)
    kkt = torch.zeros(D_IN + 1, D_IN + 1, dtype=F64)
    kkt[:D_IN, :D_IN], kkt[:D_IN, D_IN], kkt[D_IN, :D_IN] = 2 * C0, k, k
    rhs = torch.zeros(D_IN + 1, D_OUT, dtype=F64)
    rhs[D_IN] = v - W @ k
    expected = torch.linalg.solve(kkt, rhs)[:D_IN].T
    assert_close(rome_update(W, C0, k, k, v), expected)


# ---------------------------------------------------------------------------- PRUNE / RECT


def test_prune_restrains_only_large_singular_values(gen):
    W0 = rand(gen, D_OUT, D_IN)
    sigma_max = spectral_norm(W0)
    assert sigma_max == pytest.approx(float(torch.linalg.svdvals(W0)[0]), rel=1e-12)
    U, _ = torch.linalg.qr(rand(gen, D_OUT, D_OUT))
    V, _ = torch.linalg.qr(rand(gen, D_IN, D_OUT))
    s = torch.tensor([4.0, 2.0, 1.3, 1.0, 0.6, 0.3, 0.1, 0.05], dtype=F64) * sigma_max
    delta = U @ torch.diag(s) @ V.T
    restrained = prune_restrain(delta, sigma_max)
    rule = torch.where(s > sigma_max, torch.log(s) - math.log(sigma_max) + sigma_max, s)
    got = torch.linalg.svdvals(restrained)
    assert_close(got, rule, 1e-10)
    assert bool((got <= torch.maximum(s.clamp(max=sigma_max), rule) + 1e-9).all())
    assert float(got[0]) < float(s[0])  # the large ones really shrank
    assert_close(restrained @ V[:, 4:], delta @ V[:, 4:], 1e-10)  # small directions untouched
    small = 0.5 * sigma_max * delta / float(s[0])
    assert_close(prune_restrain(small, sigma_max), small, 1e-12)
    clear = U @ torch.diag(torch.where(s == sigma_max, 0.9 * s, s)) @ V.T  # none exactly at the bound
    _, top, n_big = prune_restrain_with_spectrum(clear, sigma_max)
    assert top == pytest.approx(4.0 * sigma_max, rel=1e-10) and n_big == 3  # 4, 2 and 1.3 x sigma_max
    _, top, n_big = prune_restrain_with_spectrum(small, sigma_max)
    assert top == pytest.approx(0.5 * sigma_max, rel=1e-10) and n_big == 0


@pytest.mark.parametrize("keep", [0.4, 0.2, 0.0, 1.0])
def test_rect_keeps_exactly_the_largest_relative_changes(gen, keep):
    delta, W = rand(gen, D_OUT, D_IN), rand(gen, D_OUT, D_IN)
    sparse = rect_sparsify(delta, W, keep)
    kept = sparse != 0
    assert int(kept.sum()) == round(keep * delta.numel())
    assert torch.equal(sparse[kept], delta[kept])
    rel = delta.abs() / (W.abs() + 1e-8)
    if 0 < keep < 1:
        assert float(rel[kept].min()) > float(rel[~kept].max())


# ---------------------------------------------------------------------------- RLSEdit


def test_rls_recursion_equals_the_batch_solution(gen):
    K0, C0 = generic_keys(gen)
    G = K0 / math.sqrt(K0.shape[1])
    W0 = rand(gen, D_OUT, D_IN)
    lam, lambda_reg, mu_reg = 2.0, 0.5, 1.5
    state = RLSState(W0, C0, lam, lambda_reg=lambda_reg, mu_reg=mu_reg)
    total = torch.zeros_like(W0)
    seen_K, seen_V = [], []
    for _ in range(4):
        K, V_target = rand(gen, D_IN, N), rand(gen, D_OUT, N)
        total += state.update(K, V_target)
        seen_K.append(K)
        seen_V.append(V_target)
        Ks, Vs = torch.cat(seen_K, 1), torch.cat(seen_V, 1)
        expected = solve_rows(
            [
                (Ks, Vs),
                (lambda_reg * torch.eye(D_IN, dtype=F64), lambda_reg * W0),
                (mu_reg * math.sqrt(lam) * G, mu_reg * math.sqrt(lam) * (W0 @ G)),
            ]
        )
        assert_close(state.W, expected)
        H = lambda_reg**2 * torch.eye(D_IN, dtype=F64) + mu_reg**2 * lam * C0 + Ks @ Ks.T
        assert_close(state.P @ H, torch.eye(D_IN, dtype=F64))
    assert_close(W0 + total, state.W, 1e-12)
    assert state.n_edits == 4 * N


def test_rls_state_round_trips(gen):
    _, C0 = generic_keys(gen)
    W0 = rand(gen, D_OUT, D_IN)
    a = RLSState(W0, C0, 3.0, lambda_reg=0.0, mu_reg=1.0)
    a.update(rand(gen, D_IN, N), rand(gen, D_OUT, N))
    b = RLSState(W0, C0, 3.0)
    b.load_state_dict(a.state_dict())
    K, V_target = rand(gen, D_IN, N), rand(gen, D_OUT, N)
    assert torch.equal(a.update(K, V_target), b.update(K, V_target))
    with pytest.raises(ValueError, match="lambda_reg > 0"):
        RLSState(W0, torch.zeros(D_IN, D_IN, dtype=F64), 1.0, lambda_reg=0.0)
