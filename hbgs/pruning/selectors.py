"""Lower level: choose which filters of one layer to keep (docs/algorithms.md §1.1, §1.3–1.5).

Every selector works on a matrix ``F`` with one filter per row and returns a ``Selection``: the
kept rows ``S`` and the least-squares coefficients ``Λ`` with ``F ≈ Λ F[S]``. No data is used,
only weights. Computations run in float64 on the CPU (whatever the device of ``F``): they are
loops of small sequential updates, and a layer's filters are small. A GPU run keeps them here
too (not yet measured on a GPU: consumer GPUs run float64 at 1/32-1/64 of float32 speed, and
each update would be a kernel launch); the ``Selection`` comes back on the CPU and
``compensation.pruned`` moves it to the layer's device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

METHODS = ("backward", "omp", "l1", "l2", "random")
# Ridge added to a singular Gram matrix, relative to its mean diagonal (§1.3).
RIDGE = 1e-8
# A Cholesky pivot below this fraction of its diagonal entry means a (near) linear dependency.
_PIVOT_TOL = 1e-10
# Below this fraction of the removed filters' energy the error is measured directly.
_CANCELLATION = 1e-6
# Steps between exact recomputations of the incrementally updated norms in ``_backward``.
_REFRESH = 32


def _one_intra_op_thread(fn):
    """Run ``fn`` on one intra-op thread (restored afterwards). The selectors are loops of many
    small sequential updates (512×512 at most): splitting each across threads gains little, and
    every split costs a thread hand-shake that grows to milliseconds when the cores are shared
    (data-loader workers, other jobs): measured 30× slower on a busy 2-core machine."""
    @functools.wraps(fn)
    def single_threaded(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return single_threaded


@dataclass
class Selection:
    """Filters to keep and how to rebuild all filters from them.

    keep:   LongTensor (s,), ascending row indices of the kept filters.
    coef:   float64 (n, s), least-squares ``Λ`` with ``F ≈ coef @ F[keep]``; the rows of kept
            filters are unit vectors.
    error:  ``||F − coef @ F[keep]||_F²``.
    order:  the removed filters in the order the method eliminated them (``backward``:
            greedy elimination order, so for unchanged weights a prefix of it is the greedy
            answer for fewer removals; ``l1``/``l2``: ascending norm); ``None`` for methods
            without one (``omp`` adds filters, ``random``).
    method: the selector that produced it.
    """

    keep: torch.Tensor
    coef: torch.Tensor
    error: float
    order: torch.Tensor | None = None
    method: str = ""

    @property
    def removed(self) -> torch.Tensor:
        """Ascending indices of the filters not kept."""
        mask = torch.ones(self.coef.shape[0], dtype=torch.bool)
        mask[self.keep] = False
        return mask.nonzero().flatten()


@_one_intra_op_thread
def select_filters(F: torch.Tensor, n_keep: int, method: str = "backward", *,
                   seed: int = 0) -> Selection:
    """Keep ``n_keep`` of the rows of ``F`` (n×d) chosen by ``method``, with least-squares ``Λ``.

    Methods: ``backward`` (greedy backward elimination, §1.3), ``omp`` (simultaneous OMP,
    §1.4), ``l1`` / ``l2`` (largest norms), ``random`` (uniform, seeded by ``seed``).
    """
    F = _check(F, n_keep)
    if method == "backward":
        return _backward(F, n_keep)
    if method == "omp":
        return least_squares_selection(F, _omp_keep(F, n_keep), method="omp")
    if method in ("l1", "l2"):
        norms = F.norm(p=1 if method == "l1" else 2, dim=1)
        ranked = torch.sort(norms, stable=True).indices  # least important first
        removed = ranked[: F.shape[0] - n_keep]
        return least_squares_selection(F, ranked[F.shape[0] - n_keep:], method=method,
                                       order=removed)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return least_squares_selection(F, torch.randperm(F.shape[0], generator=generator)[:n_keep],
                                       method="random")
    raise ValueError(f"unknown selector method {method!r}; valid methods: {', '.join(METHODS)}")


@_one_intra_op_thread
def least_squares_selection(F: torch.Tensor, keep, *, method: str = "given",
                            order: torch.Tensor | None = None) -> Selection:
    """The ``Selection`` for a given kept set: ``Λ`` minimising ``||F − Λ F[keep]||_F²`` (§1.1).

    Rank-deficient kept sets get the minimum-norm solution for the removed rows.
    """
    F = F.detach().to("cpu", torch.float64)
    n = F.shape[0]
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or keep.min() < 0 \
            or keep.max() >= n:
        raise ValueError(f"keep must be distinct row indices in [0, {n}), got {keep.tolist()}")
    return _fit(F, keep, None, method=method, order=order)


def _fit(F: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None, *, method: str,
         order: torch.Tensor | None) -> Selection:
    """Least-squares ``Λ`` for ``keep`` (float64 ``F``), reusing ``gram = F Fᵀ`` when given."""
    n = F.shape[0]
    keep = keep.sort().values
    removed = torch.ones(n, dtype=torch.bool)
    removed[keep] = False
    removed = removed.nonzero().flatten()
    coef = torch.zeros(n, keep.numel(), dtype=torch.float64)
    coef[keep, torch.arange(keep.numel())] = 1.0
    error = 0.0
    if removed.numel():
        F_keep, F_removed = F[keep], F[removed]
        if gram is None:
            gram_keep, cross = F_keep @ F_keep.T, F_removed @ F_keep.T
        else:
            gram_keep, cross = gram[keep][:, keep], gram[removed][:, keep]
        coef[removed] = _solve_normal_equations(gram_keep, cross, F_keep, F_removed)
        # For a least-squares Λ, E = tr(M_RR) − tr(Λ_R M_SR); when E is a tiny fraction of
        # tr(M_RR) that difference cancels, so measure it on the filters instead.
        total = F_removed.square().sum().item()
        error = total - (coef[removed] * cross).sum().item()
        if error < _CANCELLATION * total:
            error = (F_removed - coef[removed] @ F_keep).square().sum().item()
    return Selection(keep, coef, error, order, method)


@_one_intra_op_thread
def backward_naive(F: torch.Tensor, n_keep: int) -> Selection:
    """SLOW REFERENCE for ``backward``: re-inverts ``AᵀA`` at every step, as the reference code
    does. Same criterion and ridge as the fast version, so it removes the same filters; it
    exists for tests and the benchmark only. Cost per step O(s²d + nsd + s³)."""
    F = _check(F, n_keep)
    n = F.shape[0]
    ridge = _ridged_cholesky(F @ F.T, F.shape[1])[0]
    kept = list(range(n))
    order = []
    for _ in range(n - n_keep):
        order.append(kept.pop(_naive_step(F, kept, ridge)))
    return _fit(F, torch.tensor(kept), None, method="backward_naive",
                order=torch.tensor(order, dtype=torch.long))


def _naive_step(F: torch.Tensor, kept: list[int], ridge: float) -> int:
    """Position in ``kept`` of the filter ``backward_naive`` removes next."""
    A = F[kept].T  # kept filters as columns, d×s
    gamma = torch.linalg.inv(A.T @ A + ridge * torch.eye(len(kept), dtype=F.dtype))
    # Bᵀ A Γ with the ridge-augmented filters [f_i, √ε e_i] (ridge 0 when M is invertible).
    coefs = (F @ A + ridge * torch.eye(F.shape[0], dtype=F.dtype)[:, kept]) @ gamma
    return int((coefs.square().sum(0) / gamma.diagonal()).argmin())


def _backward(F: torch.Tensor, n_keep: int) -> Selection:
    """§1.3 with Γ = M[S,S]⁻¹ and C = M[:,S]Γ. C's rows of kept filters are the identity, so only
    its rows of removed filters are stored, transposed (one row per kept filter, one column per
    removed one): removing filter k is a rank-one update of Γ and of that block, plus a new
    column −Γ[:,k]/γ_k, which also zero k's row and column, so there is no re-inversion. The
    squared column norms of C (1 + the stored row's) are updated from the same rank-one terms;
    every ``_REFRESH`` steps they are recomputed exactly (so round-off cannot build up) and the
    removed filters' zero rows are dropped (so later updates are smaller)."""
    n = F.shape[0]
    gram = F @ F.T
    gamma = torch.cholesky_inverse(_ridged_cholesky(gram, F.shape[1])[1])
    removed_coefs = torch.zeros(n, n - n_keep, dtype=F.dtype)  # C[R,S]ᵀ, filled a column per step
    norms = torch.ones(n, dtype=F.dtype)  # ||C[:, j]||² = 1 + ||C[R, j]||²
    alive = torch.arange(n)  # filter index of each row of Γ and of removed_coefs
    removed_penalty = torch.zeros(n, dtype=F.dtype)
    order = torch.empty(n - n_keep, dtype=torch.long)
    for step in range(n - n_keep):
        if step % _REFRESH == _REFRESH - 1:
            rows = torch.isfinite(removed_penalty).nonzero().flatten()
            alive, gamma, removed_coefs = alive[rows], gamma[rows][:, rows], removed_coefs[rows]
            removed_penalty = removed_penalty[rows]
            norms = 1 + removed_coefs[:, :step].square().sum(1)
        k = int((norms / gamma.diagonal() + removed_penalty).argmin())
        g = gamma[k].clone()
        a = g / float(g[k])  # g / γ
        coefs = removed_coefs[:, :step]  # a view: the updates below write through
        c = coefs[k].clone()
        norms += a * (a * (1 + c.dot(c)) - 2 * torch.mv(coefs, c))
        gamma.addr_(g, a, alpha=-1.0)  # Γ − g gᵀ/γ
        coefs.addr_(a, c, alpha=-1.0)  # C[R,S] − c gᵀ/γ, transposed
        removed_coefs[:, step] = -a  # k's own row of C: M[k,S]Γ' = −g/γ on the filters still kept
        gamma[k], gamma[:, k], removed_coefs[k] = 0.0, 0.0, 0.0  # exact zeros, not round-off
        gamma[k, k] = 1.0  # keeps the cost of the removed filter finite (then +inf)
        removed_penalty[k] = torch.inf
        order[step] = alive[k]
    keep = alive[torch.isfinite(removed_penalty)]
    return _fit(F, keep, gram, method="backward", order=order)


def _omp_keep(F: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Kept rows chosen by simultaneous OMP on unit-norm filters (§1.4), as in the reference:
    score ``ξ_i = Σ_j |⟨r_j, f̂_i⟩|``, add the best, refit all filters on the selected ones with
    ridge weight 1. Residual correlations are taken through the Gram matrix (``R F̂ᵀ =
    M̂ − X M̂[S,:]``), which avoids touching the d-dimensional filters inside the loop."""
    unit = F / F.norm(dim=1, keepdim=True).clamp_min(torch.finfo(F.dtype).tiny)
    gram = unit @ unit.T
    correlations = gram  # residuals are the filters themselves before any selection
    selected_penalty = torch.zeros(F.shape[0], dtype=F.dtype)
    selected = []
    for _ in range(n_keep):
        i = int((correlations.abs().sum(0) - selected_penalty).argmax())
        selected.append(i)
        selected_penalty[i] = torch.inf
        S = torch.tensor(selected)
        ridge_gram = gram[S][:, S] + torch.eye(len(selected), dtype=F.dtype)
        coefs_t = torch.linalg.solve(ridge_gram, gram[S])  # Xᵀ, |S|×n
        correlations = gram - coefs_t.T @ gram[S]
    return torch.tensor(selected)


def _solve_normal_equations(gram_keep, cross, F_keep, F_target) -> torch.Tensor:
    """``X`` minimising ``||F_target − X F_keep||`` from ``X gram_keep = cross``; falls back to
    an SVD least-squares (minimum norm) on the filters when the kept ones are (nearly)
    dependent, where the normal equations lose accuracy."""
    chol, info = torch.linalg.cholesky_ex(gram_keep)
    if info == 0 and (chol.diagonal().square() > _PIVOT_TOL * gram_keep.diagonal()).all():
        return torch.cholesky_solve(cross.T, chol).T
    return torch.linalg.lstsq(F_keep.T, F_target.T, driver="gelsd").solution.T


def _ridged_cholesky(gram: torch.Tensor, d: int) -> tuple[float, torch.Tensor]:
    """``ε`` and the Cholesky factor of ``M + εI``: ``ε = 0`` when ``M`` is safely invertible,
    else ``RIDGE·mean(diag M)`` (always when n > d)."""
    if gram.shape[0] <= d:
        chol, info = torch.linalg.cholesky_ex(gram)
        if info == 0 and (chol.diagonal().square() > _PIVOT_TOL * gram.diagonal()).all():
            return 0.0, chol
    scale = gram.diagonal().mean().item()
    ridge = RIDGE * (scale if scale > 0 else 1.0)
    return ridge, torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype))


def _check(F, n_keep) -> torch.Tensor:
    """``F`` as a detached float64 matrix after validating the arguments."""
    if not isinstance(F, torch.Tensor) or F.dim() != 2 or F.shape[0] == 0 or F.shape[1] == 0:
        shape = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
        raise ValueError(f"F must be a non-empty 2-D tensor (one filter per row), got {shape}")
    n = F.shape[0]
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be an integer between 1 and the number of filters "
                         f"({n}), got {n_keep!r}")
    if not torch.isfinite(F).all():
        raise ValueError("F contains NaN or infinite values")
    return F.detach().to("cpu", torch.float64)
