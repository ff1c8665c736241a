"""Closed-form weight updates of the locate-then-edit family, on plain tensors.

Every editor (MEMIT, MEMIT_seq, AlphaEdit, LyapLock, ROME, PRUNE, RECT, ENCORE, RLSEdit) reduces
to a few lines of linear algebra on one weight matrix per edited layer; those lines live here and
nowhere else. Nothing in this module knows about models.

Conventions (shared by every function):

- ``W`` is ``(d_out, d_in)``: the caller transposes GPT-2 ``Conv1D`` weights first.
- ``K`` is ``(d_in, n)``, one key column per edit; ``R`` is ``(d_out, n)``, the residual each
  edit still needs (``target value - W k``).
- ``C0 = E[k k^T]`` is ``(d_in, d_in)``: a per-token *mean* over generic text, symmetric PSD.
- ``lam`` is ``mom2_update_weight``.

Numerics: everything is computed in float64 on the device of the first tensor argument, with
Cholesky factorisations (or an LU solve for AlphaEdit's non-symmetric system) against the
right-hand side. No explicit inverse is formed (RLSEdit's initial state is the one documented
exception) and no ``d_in x d_in x d_in`` product is used to get a trace. Results come back in the
dtype and on the device of the tensor they are an update of (``R`` or ``W``), so a float32 model
gets float32 deltas; pass float64 inputs to keep float64 results.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EditMemory",
    "RLSState",
    "alphaedit_delta",
    "encore_delta",
    "lyaplock_delta",
    "lyaplock_nullspace_delta",
    "lyaplock_system",
    "memit_delta",
    "nullspace_projector",
    "preservation_loss",
    "preservation_loss_from_moments",
    "prune_restrain",
    "rect_sparsify",
    "rome_update",
    "spectral_norm",
]

_F64 = torch.float64


def _f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=_F64)


def _check_edit_shapes(R: torch.Tensor, K: torch.Tensor, C0: torch.Tensor | None = None) -> None:
    if R.dim() != 2 or K.dim() != 2 or R.shape[1] != K.shape[1]:
        raise ValueError(
            f"expected residuals R of shape (d_out, n) and keys K of shape (d_in, n) with one "
            f"column per edit; got R {tuple(R.shape)} and K {tuple(K.shape)} (transpose "
            f"row-per-edit matrices before calling)"
        )
    if C0 is not None and tuple(C0.shape) != (K.shape[0], K.shape[0]):
        raise ValueError(
            f"C0 must be (d_in, d_in) = ({K.shape[0]}, {K.shape[0]}) to match the keys; got "
            f"{tuple(C0.shape)} (is the weight transposed? GPT-2 Conv1D weights are (d_in, d_out))"
        )


def _cholesky(A: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(
            f"{what} is not positive definite (Cholesky failed at leading minor {int(info)}). "
            f"Check the second-moment statistics for NaN/inf or too few samples, or raise the "
            f"regularisation (mom2_update_weight / L2 / lambda_reg)."
        )
    return L


def _spd_solve(A: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    """X = A^-1 B for symmetric positive definite A, through a Cholesky factor."""
    return torch.cholesky_solve(B, _cholesky(A, what))


def _add_to_diagonal(A: torch.Tensor, value: float) -> torch.Tensor:
    A.diagonal().add_(value)
    return A


# --------------------------------------------------------------------------------------------
# MEMIT family: ridge regression of the edits against the covariance-weighted preservation term
# --------------------------------------------------------------------------------------------


def _ridge_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    prev_KKt: torch.Tensor | None,
    mu: float,
) -> torch.Tensor:
    _check_edit_shapes(R, K, C0)
    dev = R.device
    K64 = _f64(K, dev)
    A = lam * _f64(C0, dev) + K64 @ K64.T
    if prev_KKt is not None:
        A += _f64(prev_KKt, dev)
    if mu:
        _add_to_diagonal(A, mu)
    # A is symmetric, so R K^T A^-1 = R (A^-1 K)^T: solve for n right-hand sides, not d_out.
    X = _spd_solve(A, K64, "the MEMIT system matrix lam*C0 + prev_KKt + K K^T")
    return (_f64(R, dev) @ X.T).to(R.dtype)


def memit_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    prev_KKt: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEMIT (and MEMIT_seq) update ``Delta = R K^T (lam C0 + prev_KKt + K K^T)^-1``.

    It minimises ``||Delta K - R||_F^2 + lam tr(Delta C0 Delta^T) + ||Delta K_prev||_F^2`` where
    ``prev_KKt = K_prev K_prev^T`` (sum over earlier batches, MEMIT_seq; ``None`` for MEMIT):
    fit the new edits, leave generic keys and, for MEMIT_seq, earlier edits where they are.
    Returns ``(d_out, d_in)`` in ``R``'s dtype.
    """
    return _ridge_delta(R, K, C0, lam, prev_KKt, 0.0)


def encore_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    mu: float,
    prev_KKt: torch.Tensor | None = None,
) -> torch.Tensor:
    """ENCORE update ``Delta = R K^T (lam C0 + mu I + prev_KKt + K K^T)^-1``.

    MEMIT_seq's objective plus the Frobenius-norm penalty ``mu ||Delta||_F^2``
    (``mu = update_norm_lambda``), which keeps the norm of the accumulated weights in check.
    """
    if mu < 0:
        raise ValueError(f"ENCORE's norm penalty mu must be >= 0, got {mu}")
    return _ridge_delta(R, K, C0, lam, prev_KKt, float(mu))


# --------------------------------------------------------------------------------------------
# AlphaEdit: the update is confined to the (approximate) null space of the generic keys
# --------------------------------------------------------------------------------------------


def nullspace_projector(C0: torch.Tensor, threshold: float = 2e-2) -> torch.Tensor:
    """Projector ``P = U U^T`` onto the eigenvectors of ``C0`` whose eigenvalue is below ``threshold``.

    The reference takes the SVD of ``C0`` and keeps singular vectors with singular value
    ``< threshold`` (an absolute threshold on ``E[k k^T]``). For a symmetric matrix the singular
    values are the absolute eigenvalues, so ``eigh`` on ``|lambda|`` selects the same subspace at
    a fraction of the cost. Returns ``(d_in, d_in)`` in ``C0``'s dtype; an empty null space gives
    ``P = 0`` (AlphaEdit then makes no change).
    """
    if C0.dim() != 2 or C0.shape[0] != C0.shape[1]:
        raise ValueError(f"C0 must be a square (d_in, d_in) matrix, got {tuple(C0.shape)}")
    C = _f64(C0, C0.device)
    eigvals, eigvecs = torch.linalg.eigh((C + C.T) / 2)
    U = eigvecs[:, eigvals.abs() < threshold]
    return (U @ U.T).to(C0.dtype)


def alphaedit_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    P: torch.Tensor,
    prev_KKt: torch.Tensor | None = None,
    l2: float = 10.0,
) -> torch.Tensor:
    """AlphaEdit update ``Delta = R K^T P ((prev_KKt + K K^T) P + l2 I)^-1``.

    Equivalent to the reference's ``(P (K K^T + C_p) + l2 I) X = P K R^T, Delta = X^T``.
    ``Delta`` vanishes on the range of ``I - P`` (for ``P u = 0``: ``(S P + l2 I) u = l2 u``, so
    ``Delta u = R K^T P u / l2 = 0``), i.e. generic keys keep their outputs, and it is the
    minimiser of ``||Delta K - R||^2 + ||Delta K_prev||^2 + l2 ||Delta||^2`` over updates of the
    form ``Delta = Delta P``, with ``S = prev_KKt + K K^T``. The system matrix is not symmetric,
    hence an LU solve; since ``S`` and ``P`` are symmetric, ``Delta = R Y^T`` with
    ``(P S + l2 I) Y = P K`` (n right-hand sides instead of d_out).
    """
    _check_edit_shapes(R, K, P)
    if l2 <= 0:
        raise ValueError(f"AlphaEdit's L2 must be > 0 for a well-posed solve, got {l2}")
    dev = R.device
    K64, P64 = _f64(K, dev), _f64(P, dev)
    S = K64 @ K64.T
    if prev_KKt is not None:
        S += _f64(prev_KKt, dev)
    M = _add_to_diagonal(P64 @ S, l2)
    Y = torch.linalg.solve(M, P64 @ K64)
    return (_f64(R, dev) @ Y.T).to(R.dtype)


# --------------------------------------------------------------------------------------------
# Preservation loss (LyapLock's distortion D)
# --------------------------------------------------------------------------------------------


def preservation_loss(W: torch.Tensor, W0: torch.Tensor, C0: torch.Tensor) -> float:
    """``D(W) = tr((W - W0) C0 (W - W0)^T) = E_k ||W k - W0 k||^2`` as a Python float.

    Computed as ``sum(((W - W0) C0) * (W - W0))`` in float64: ``O(d_out d_in^2)`` and no
    cancellation between large terms. This is the reference's three-term trace form whenever
    ``V0 = W0 K0`` (true for GPT-2, GPT-J and Llama down-projections).
    """
    dev = W.device
    dW = _f64(W, dev) - _f64(W0, dev)
    return float(((dW @ _f64(C0, dev)) * dW).sum())


def preservation_loss_from_moments(
    W: torch.Tensor, C0: torch.Tensor, V0K0t: torch.Tensor, trace_V0V0t: float
) -> float:
    """Three-term form ``tr(W C0 W^T) - 2 tr(V0K0^T W^T) + tr(V0V0^T) = E ||W k - v0||^2``.

    For layers whose generic-text outputs ``v0`` are not ``W0 k`` (e.g. recorded module outputs).
    Each trace is an elementwise product sum, never a ``d_in^3`` product. It subtracts numbers of
    size ``||v0||^2`` to get a small result, so prefer :func:`preservation_loss` when it applies.
    """
    dev = W.device
    W64 = _f64(W, dev)
    return float(
        ((W64 @ _f64(C0, dev)) * W64).sum()
        - 2.0 * (_f64(V0K0t, dev) * W64).sum()
        + float(trace_V0V0t)
    )


# --------------------------------------------------------------------------------------------
# LyapLock: drift-plus-penalty step (paper Eqs. 6-13; reference notes 1.8)
# --------------------------------------------------------------------------------------------


def lyaplock_system(
    R: torch.Tensor,
    K: torch.Tensor,
    W: torch.Tensor,
    W0: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    q: float,
    V: float = 1.0,
    S_VK: torch.Tensor | None = None,
    S_KK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations ``Delta A = left`` of one LyapLock step, in float64 on ``W``'s device:

    ``left = V R K^T + q lam (W0 - W) C0 + V (S_VK - W S_KK)`` and
    ``A = V K K^T + q lam C0 + V S_KK`` (symmetric positive definite).

    They are the stationarity conditions of
    ``V ||W' K - (W K + R)||^2 + q lam tr((W' - W0) C0 (W' - W0)^T) + V sum_p ||W' k_p - v_p||^2``
    in ``Delta = W' - W`` (see :func:`lyaplock_delta`).
    """
    _check_edit_shapes(R, K, C0)
    if (S_VK is None) != (S_KK is None):
        raise ValueError("pass both S_VK and S_KK (from the same EditMemory) or neither")
    dev = W.device
    K64, W64, C64 = _f64(K, dev), _f64(W, dev), _f64(C0, dev)
    anchor = q * lam
    left = V * (_f64(R, dev) @ K64.T) + anchor * ((_f64(W0, dev) - W64) @ C64)
    A = V * (K64 @ K64.T) + anchor * C64
    if S_KK is not None:
        S_KK64 = _f64(S_KK, dev)
        left += V * (_f64(S_VK, dev) - W64 @ S_KK64)
        A += V * S_KK64
    return left, A


def lyaplock_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    W: torch.Tensor,
    W0: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    q: float,
    V: float = 1.0,
    S_VK: torch.Tensor | None = None,
    S_KK: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LyapLock step: ``Delta = left A^-1`` with

    ``left = V R K^T + q lam (W0 - W) C0 + V (S_VK - W S_KK)`` and
    ``A = V K K^T + q lam C0 + V S_KK`` (symmetric positive definite: Cholesky).

    ``W' = W + Delta`` is the exact minimiser of
    ``V ||W' K - (W K + R)||^2 + q lam tr((W' - W0) C0 (W' - W0)^T) + V sum_p ||W' k_p - v_p||^2``:
    fit the new edits, pull the layer toward the original model's outputs on generic text with
    the queue-driven weight ``q = a Z`` (``q lam D(W')``), and keep earlier edits at the values
    stored in ``S_VK = sum_p v_p k_p^T``, ``S_KK = sum_p k_p k_p^T`` (:class:`EditMemory`).
    The reference writes ``(W0 - W) C0`` as ``V0K0^T - W K0K0^T``; the two agree because
    ``V0 = W0 K0``. The reference's first batch is this with ``V = q = 1`` and no memory.
    """
    left, A = lyaplock_system(R, K, W, W0, C0, lam, q, V, S_VK, S_KK)
    # A symmetric: left A^-1 = (A^-1 left^T)^T.
    X = _spd_solve(A, left.T, "the LyapLock system matrix V K K^T + q lam C0 + V S_KK")
    return X.T.to(W.dtype)


def lyaplock_nullspace_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    W: torch.Tensor,
    W0: torch.Tensor,
    C0: torch.Tensor,
    lam: float,
    q: float,
    P: torch.Tensor,
    l2: float = 10.0,
    V: float = 1.0,
    S_VK: torch.Tensor | None = None,
    S_KK: torch.Tensor | None = None,
) -> torch.Tensor:
    """LyapLock's step confined to AlphaEdit's null space: ``Delta = left P (A P + l2 I)^-1``.

    ``left, A`` are LyapLock's normal equations (:func:`lyaplock_system`), ``P`` the projector
    onto the null space of the generic keys (:func:`nullspace_projector`).

    Derivation. Minimise ``J(Delta) + l2 ||Delta||_F^2`` (``J`` the LyapLock objective of
    :func:`lyaplock_delta`, ``l2`` AlphaEdit's ridge term) over updates that vanish outside the
    null space, ``Delta = Delta P``. ``J`` is quadratic with gradient ``2 (Delta A - left)``, so
    the restricted stationarity condition is ``(Delta (A + l2 I) - left) P = 0`` together with
    ``Delta (I - P) = 0``. The matrix ``M = A P + l2 I`` is invertible (``M v = 0`` gives
    ``P A P v = -l2 P v``, so ``P v = 0`` since ``A`` is PSD, and then ``l2 v = 0``).
    ``D = left P M^-1`` satisfies both conditions: from ``D (A P + l2 I) = left P``, multiplying
    on the right by ``I - P`` (``P (I - P) = 0``) gives ``l2 D (I - P) = 0``, so ``D = D P``; then
    ``D A P + l2 D P = D (A + l2 I) P = left P``. The objective restricted to that subspace is
    strictly convex (``l2 > 0``), so ``D`` is its unique minimiser. With ``P = I`` this is
    LyapLock's step with an extra ridge; with ``q lam = 0``, ``V = 1`` and ``S_VK = W S_KK``
    (earlier edits kept at their current outputs) it is AlphaEdit's update ``R K^T P ((S_KK + K K^T) P + l2 I)^-1``. ``M`` is not symmetric: LU solve,
    through ``M^T`` so that the right-hand side has ``d_out`` columns.
    """
    if l2 <= 0:
        raise ValueError(f"the null-space LyapLock step needs l2 > 0 for a well-posed solve, got {l2}")
    left, A = lyaplock_system(R, K, W, W0, C0, lam, q, V, S_VK, S_KK)
    P64 = _f64(P, left.device)
    if tuple(P64.shape) != tuple(A.shape):
        raise ValueError(f"P must be (d_in, d_in) = {tuple(A.shape)}, got {tuple(P.shape)}")
    M = _add_to_diagonal(A @ P64, l2)
    # Delta M = left P  <=>  M^T Delta^T = P left^T (P symmetric)
    X = torch.linalg.solve(M.T, P64 @ left.T)
    return X.T.to(W.dtype)


class EditMemory:
    """Running statistics of all edits written into one layer so far.

    ``S_KK = sum_t K_t K_t^T`` (what MEMIT_seq, AlphaEdit, ENCORE and NSE call ``cache_c`` /
    ``prev_KKt``) and, with ``track_values``, ``S_VK = sum_t (W_t K_t) K_t^T`` where ``W_t`` is the
    layer's weight right after batch ``t``: the values LyapLock keeps earlier edits at. Held in
    float64 on ``device`` (default: the device of the first keys).
    """

    def __init__(self, track_values: bool = True, device: torch.device | str | None = None):
        self.track_values = track_values
        self.device = torch.device(device) if device is not None else None
        self.S_KK: torch.Tensor | None = None
        self.S_VK: torch.Tensor | None = None
        self.n_edits = 0

    def add(self, K: torch.Tensor, W_new: torch.Tensor | None = None) -> None:
        """Record a batch of keys ``K`` (d_in, n), stored at the values ``W_new K``."""
        if K.dim() != 2:
            raise ValueError(f"keys must be (d_in, n), got {tuple(K.shape)}")
        if self.track_values and W_new is None:
            raise ValueError(
                "this EditMemory tracks values: pass W_new, the layer weight after the edit "
                "(or create it with track_values=False if only sum K K^T is needed)"
            )
        if self.device is None:
            self.device = K.device
        K64 = _f64(K, self.device)
        KKt = K64 @ K64.T
        self.S_KK = KKt if self.S_KK is None else self.S_KK + KKt
        if self.track_values:
            VKt = (_f64(W_new, self.device) @ K64) @ K64.T
            self.S_VK = VKt if self.S_VK is None else self.S_VK + VKt
        self.n_edits += K.shape[1]

    def state_dict(self) -> dict:
        return {
            "track_values": self.track_values,
            "n_edits": self.n_edits,
            "S_KK": self.S_KK,
            "S_VK": self.S_VK,
        }

    def load_state_dict(self, state: dict) -> None:
        self.track_values = bool(state["track_values"])
        self.n_edits = int(state["n_edits"])
        self.S_KK, self.S_VK = state["S_KK"], state["S_VK"]
        if self.S_KK is not None:
            if self.device is None:
                self.device = self.S_KK.device
            self.S_KK = _f64(self.S_KK, self.device).clone()
            if self.S_VK is not None:
                self.S_VK = _f64(self.S_VK, self.device).clone()


# --------------------------------------------------------------------------------------------
# ROME, PRUNE, RECT
# --------------------------------------------------------------------------------------------


def rome_update(
    W: torch.Tensor,
    C0: torch.Tensor | None,
    k_star: torch.Tensor,
    k_clean: torch.Tensor,
    v_star: torch.Tensor,
    w_k_clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's rank-one update ``Delta = right u^T``.

    ``u = C0^-1 k* / ||C0^-1 k*||`` (``C0=None``: no covariance adjustment, ``u = k*/||k*||``) and
    ``right = (v* - W k_clean) / (k_clean . u)``, so that ``(W + Delta) k_clean = v*``.
    ``w_k_clean`` is the module's actual output on ``k_clean`` (defaults to ``W k_clean``; pass
    the recorded output when the module has a bias). With ``k_clean = k*`` this is the minimiser
    of ``tr(Delta C0 Delta^T)`` subject to ``(W + Delta) k* = v*``.
    """
    dev = W.device
    k = _f64(k_star.reshape(-1), dev)
    if C0 is not None:
        u = _spd_solve(_f64(C0, dev), k.unsqueeze(1), "the covariance C0").squeeze(1)
    else:
        u = k
    u = u / torch.linalg.vector_norm(u)
    kc = _f64(k_clean.reshape(-1), dev)
    out = _f64(W, dev) @ kc if w_k_clean is None else _f64(w_k_clean.reshape(-1), dev)
    denom = torch.dot(kc, u)
    if float(denom.abs()) == 0.0:
        raise ValueError("k_clean is orthogonal to the ROME direction u; the edit is undefined")
    right = (_f64(v_star.reshape(-1), dev) - out) / denom
    return torch.outer(right, u).to(W.dtype)


def spectral_norm(W: torch.Tensor) -> float:
    """Largest singular value of ``W`` (PRUNE's bound ``sigma_max(W0)``), in float64."""
    return float(torch.linalg.matrix_norm(_f64(W, W.device), ord=2))


def prune_restrain(delta_total: torch.Tensor, sigma_max_W0: float) -> torch.Tensor:
    """PRUNE: restrain the large singular values of an accumulated update.

    ``delta_total = U diag(s) V^T``; every ``s > sigma_max`` becomes
    ``ln(s) - ln(sigma_max) + sigma_max`` (continuous at ``sigma_max``, growing only
    logarithmically beyond it); the rest are kept. Returns the rebuilt update: the official
    PRUNE sets ``W = W0 + restrained``. (The LL/AE baseline adds it to the already edited weight
    instead; see reference notes 1.4.)
    """
    return prune_restrain_with_spectrum(delta_total, sigma_max_W0)[0]


def prune_restrain_with_spectrum(delta_total: torch.Tensor, sigma_max_W0: float) -> tuple[torch.Tensor, float, int]:
    """:func:`prune_restrain` plus what it saw: the accumulated update's largest singular value
    and how many singular values exceeded the bound (0: the restraint left the update as it was)."""
    if sigma_max_W0 <= 0:
        raise ValueError(f"sigma_max_W0 must be > 0 (use spectral_norm(W0)), got {sigma_max_W0}")
    D = _f64(delta_total, delta_total.device)
    U, s, Vh = torch.linalg.svd(D, full_matrices=False)
    big = s > sigma_max_W0
    top, n_big = float(s[0]) if s.numel() else 0.0, int(big.sum())
    s = torch.where(big, torch.log(s) - math.log(sigma_max_W0) + sigma_max_W0, s)
    return ((U * s) @ Vh).to(delta_total.dtype), top, n_big


def rect_sparsify(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float = 0.4) -> torch.Tensor:
    """RECT: keep the entries of ``delta`` with the largest relative change, zero the rest.

    Relative change ``|delta_ij| / (|W_ij| + 1e-8)``; exactly ``round(keep_fraction * numel)``
    entries survive (those strictly above the ``kthvalue`` threshold; ties at the threshold are
    dropped). LL/AE keep ``>=`` their ``kthvalue``, i.e. one entry more; default 0.4 as there,
    the official RECT uses 0.2.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    if delta.shape != W.shape:
        raise ValueError(
            f"delta {tuple(delta.shape)} and W {tuple(W.shape)} must have the same shape "
            f"(transpose the update for GPT-2 Conv1D weights)"
        )
    rel = delta.detach().abs().to(_F64) / (W.detach().to(delta.device, _F64).abs() + 1e-8)
    n = rel.numel()
    n_drop = n - round(keep_fraction * n)
    if n_drop <= 0:
        return delta.clone()
    threshold = torch.kthvalue(rel.reshape(-1), n_drop).values
    return torch.where(rel > threshold, delta, torch.zeros_like(delta))


# --------------------------------------------------------------------------------------------
# RLSEdit: recursive least squares over the whole edit stream
# --------------------------------------------------------------------------------------------


class RLSState:
    """Recursive least-squares solution of one layer over all edits so far (RLSEdit).

    After batches ``1..t`` the state holds the minimiser of
    ``sum_s ||W K_s - V_s||^2 + lambda_reg^2 ||W - W0||_F^2 + mu_reg^2 lam tr((W-W0) C0 (W-W0)^T)``
    (edits, a soft pull toward the pre-trained weights, and the anchor mapping of generic keys)
    together with ``P = H_t^-1``, ``H_t = lambda_reg^2 I + mu_reg^2 lam C0 + sum_s K_s K_s^T``.

    RLS propagates the inverse itself: each batch is a rank-``n`` Woodbury correction
    ``F = P K, S = I_n + K^T F, P <- P - F S^-1 F^T`` (Cholesky of the small ``S``), and
    ``W <- W + (V - W K) (P K)^T``, so a batch costs ``O(d_in^2 n)`` no matter how many edits came
    before. That is why ``P_0 = H_0^-1`` is formed explicitly once (from a Cholesky factor), the
    one inverse in this module.
    """

    def __init__(
        self,
        W0: torch.Tensor,
        C0: torch.Tensor,
        lam: float,
        lambda_reg: float = 0.0,
        mu_reg: float = 1.0,
    ):
        dev = W0.device
        self.lam, self.lambda_reg, self.mu_reg = float(lam), float(lambda_reg), float(mu_reg)
        H0 = _add_to_diagonal((mu_reg**2 * lam) * _f64(C0, dev), lambda_reg**2)
        L = _cholesky(H0, "the RLSEdit prior lambda_reg^2 I + mu_reg^2 lam C0 (set lambda_reg > 0)")
        self.P = torch.cholesky_inverse(L)
        self.W = _f64(W0, dev).clone()
        self.n_edits = 0

    def update(self, K: torch.Tensor, V_target: torch.Tensor) -> torch.Tensor:
        """Absorb a batch (keys ``K`` (d_in, n), target values ``V_target`` (d_out, n)).

        Returns the change of the cumulative solution, ``(d_out, d_in)`` in ``V_target``'s dtype:
        add it to the layer (whose weight is the previous solution).
        """
        _check_edit_shapes(V_target, K, self.P)
        dev = self.P.device
        K64 = _f64(K, dev)
        F = self.P @ K64
        S = _add_to_diagonal(K64.T @ F, 1.0)
        G = _spd_solve(S, F.T, "the RLS innovation matrix I + K^T P K")  # S^-1 F^T = (P_new K)^T
        P = self.P - F @ G
        self.P = (P + P.T) / 2  # keep rounding from breaking the symmetry over many batches
        delta = (_f64(V_target, dev) - self.W @ K64) @ G
        self.W += delta
        self.n_edits += K.shape[1]
        return delta.to(V_target.dtype)

    def state_dict(self) -> dict:
        return {
            "lam": self.lam,
            "lambda_reg": self.lambda_reg,
            "mu_reg": self.mu_reg,
            "n_edits": self.n_edits,
            "P": self.P,
            "W": self.W,
        }

    def load_state_dict(self, state: dict) -> None:
        dev = self.P.device
        self.lam = float(state["lam"])
        self.lambda_reg = float(state["lambda_reg"])
        self.mu_reg = float(state["mu_reg"])
        self.n_edits = int(state["n_edits"])
        self.P = _f64(state["P"], dev).clone()
        self.W = _f64(state["W"], dev).clone()
