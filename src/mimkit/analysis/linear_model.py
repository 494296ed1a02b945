"""The linear MAE + EMA-teacher experiment of rc-mae.txt Sec. 4 / App. E.1 (Fig. 2, top row).

Model (App. B, Eq. 7). Student ``S`` and teacher ``T`` are one ``dim x dim`` weight matrix with a bias,
reconstructing the full input ``x`` from the masked input ``x~ = x * m`` (``m`` binary, ``mask_ratio`` of
the components set to zero, the exact count per sample as in MAE):

    L_r = 1/2 ||S x~ - x||^2                         grad_S L_r = S x~ x~^T - x x~^T      (7c)
    L_c = 1/2 ||S x~ - StopGrad(T x~)||^2            grad_S L_c = (S - T) x~ x~^T         (7c)

The bias is carried as a last column of the weight matrix, ``P = [W | b]``, acting on the augmented input
``a = [x~; 1]`` (the constant 1 is never masked). The gradients are then exactly the closed forms above
with ``x~`` replaced by ``a``: ``grad L_r = (P a - x) a^T`` and ``grad L_c = (P - Q) a a^T`` (``Q`` the
teacher's ``[W | b]``); with a zero bias the weight block is literally Eq. (7c). Norms and cosines are taken
over the whole parameter ``[W | b]``.

Training (Table 8): mini-batches of ``batch_size`` points, loss ``L_r + L_c`` averaged over the batch,
SGD with heavy-ball momentum (PyTorch semantics: ``v <- mu v + g``, ``P <- P - lr v``), then the EMA
teacher update ``Q <- alpha Q + (1 - alpha) P`` (Eq. 2) after every step. Student init as
``torch.nn.Linear`` (uniform in +-1/sqrt(dim)); the teacher starts as a copy of the student.

Probe (Sec. 4 "Empirical Test"), after every training iteration: an extra batch of ``probe_batch`` points
is drawn; for each point three two-input sequences are built (Table 1): ``same`` (the point twice),
``similar`` (another point of the same cluster), ``different`` (a point of another, uniformly chosen
cluster). For each sequence one gradient step on the first input and one teacher update are taken on a
copy of (student, teacher), then ``grad L_r`` and ``grad L_c`` are evaluated on the second input. The
first step is the same for the three types, so it is computed once per point; everything is batched over
the probe points and the three types. By default both inputs of a sequence share one mask, so ``same``
really gives identical masked inputs (cos(x^, x~) = 1, case 1 of Prop. 4.1); ``shared_mask=False`` draws a
fresh mask for the second input. ``probe_step="sgd"`` (default) is a plain gradient step
``S' = S - lr grad``; ``"optimizer"`` is a step of the training optimiser, momentum buffer included
(``S' = S - lr (mu v + grad)``) — the buffer's part is the same for the three types.

Data (App. E.1): ``clusters`` Gaussian clusters in R^dim, means ~ U(-3, 3) per component, covariances
~ Wishart(df, V) with V diagonal, diagonal ~ U(0.25, 0.35). The paper's numbers are inconsistent:
"54 degrees of freedom (1.5 x dimensionality)" (1.5 x 32 = 48) and "200 points per cluster ... 1000
instances" (10 x 200 = 2000). We follow the stated rules — ``wishart_df`` defaults to ``round(1.5 * dim)``
= 48 and ``points_per_cluster`` to 200 (2000 points) — and both are configurable (54 and 100 reproduce
the other readings). Note that a Wishart(df, V) matrix has mean ``df * V``, i.e. per-component variances
around 48 x 0.3 = 14.4, much larger than the spread of the means (variance 3): the clusters overlap, and
two points of one cluster are nearly as dissimilar as points of two clusters (mean cos(x~1, x~2) about 0.18
vs 0.0). ``cov_normalize=True`` divides the draw by ``df`` (mean covariance ``V``, per-component variance
about 0.3): tight clusters, "similar" inputs with cos about 0.9 — the other possible reading of
"Wishart(V_i)", and the one under which all of the paper's trends show (docs/analysis.md).
Every run draws its own data set, initialisation, batches and masks from ``seed`` and the run index.

Teacher-free arm (``arm="free"``, issue 15, ``method.name=rc-mae-free``): no teacher is trained; the optimiser
keeps ``D = S - T`` by ``D <- alpha (D + Delta)`` after each step (``Delta`` = the step) and adds
``grad L_c = D A`` with ``A`` = the batch's ``mean a a^T``. It draws the same data, batches, masks and probes as
the teacher arm, so both trajectories are equal up to float round-off (tested); the probe uses ``S - D`` as the
teacher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mimkit.analysis.trends import SEQUENCE_TYPES, trend_verdicts, type_statistics
from mimkit.errors import MimkitError

DTYPE = torch.float64
PROBE_STEPS = ("sgd", "optimizer")
ARMS = ("teacher", "free")   # EMA teacher (RC-MAE) | teacher-free correction in the optimiser (rc-mae-free)


@dataclass(frozen=True)
class LinearModelConfig:
    """Settings of the linear-model experiment (defaults: rc-mae.txt App. E.1 and Table 8)."""

    dim: int = 32
    clusters: int = 10
    points_per_cluster: int = 200
    mean_range: float = 3.0            # cluster means ~ U(-mean_range, mean_range)
    wishart_df: int | None = None      # None: round(1.5 * dim) (48 for dim 32; the paper prints 54)
    scale_low: float = 0.25            # diagonal of the Wishart scale V ~ U(scale_low, scale_high)
    scale_high: float = 0.35
    cov_normalize: bool = False        # divide the Wishart draw by df (mean covariance V instead of df * V)
    mask_ratio: float = 0.5
    lr: float = 1e-3
    sgd_momentum: float = 0.97
    teacher_momentum: float = 0.9      # alpha
    batch_size: int = 32
    iterations: int = 500
    runs: int = 5
    probe_batch: int = 32              # size of the extra batch probed after every iteration
    probe_step: str = "sgd"            # sgd | optimizer
    shared_mask: bool = True           # both inputs of a sequence use the same mask
    seed: int = 0
    near_zero: float = 0.1             # |mean cos| threshold for "near zero"

    @property
    def df(self) -> int:
        return int(self.wishart_df) if self.wishart_df is not None else round(1.5 * self.dim)

    @property
    def num_keep(self) -> int:
        return int(self.dim * (1 - self.mask_ratio))

    def validate(self) -> LinearModelConfig:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise MimkitError(f"linear-model {name} must be an integer >= {low}, got {v!r}")

        def number(name: str, low: float, high: float, *, open_low=False, open_high=False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
            if not ok:
                lb, hb = "(" if open_low else "[", ")" if open_high else "]"
                raise MimkitError(f"linear-model {name} must be a number in {lb}{low:g}, {high:g}{hb}, got {v!r}")

        for name in ("dim", "points_per_cluster", "clusters"):
            integer(name, 2)
        for name in ("batch_size", "iterations", "runs", "probe_batch"):
            integer(name, 1)
        integer("seed", 0)
        if self.wishart_df is not None:
            integer("wishart_df", 1)
        if self.df < self.dim:
            raise MimkitError(f"linear-model wishart_df must be >= dim ({self.dim}) for a full-rank covariance, "
                              f"got {self.df}")
        number("mean_range", 0.0, math.inf, open_high=True)
        number("scale_low", 0.0, math.inf, open_low=True, open_high=True)
        number("scale_high", 0.0, math.inf, open_low=True, open_high=True)
        if self.scale_high < self.scale_low:
            raise MimkitError(f"linear-model scale_high ({self.scale_high}) must be >= scale_low ({self.scale_low})")
        number("mask_ratio", 0.0, 1.0, open_low=True, open_high=True)
        if not 1 <= self.num_keep < self.dim:
            raise MimkitError(f"linear-model mask_ratio {self.mask_ratio} keeps {self.num_keep} of {self.dim} "
                              "components; choose one that keeps at least one and masks at least one")
        number("lr", 0.0, math.inf, open_low=True, open_high=True)
        number("sgd_momentum", 0.0, 1.0, open_high=True)
        number("teacher_momentum", 0.0, 1.0)
        number("near_zero", 0.0, 1.0)
        if self.probe_step not in PROBE_STEPS:
            raise MimkitError(f"unknown linear-model probe_step {self.probe_step!r}; "
                              f"accepted: {', '.join(PROBE_STEPS)}")
        for name in ("shared_mask", "cov_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise MimkitError(f"linear-model {name} must be true or false, got {getattr(self, name)!r}")
        return self


# ------------------------------------------------------------------------------------------------ data
def sample_clusters(cfg: LinearModelConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The App. E.1 data set: ``(X, labels)`` with X (clusters * points_per_cluster, dim) float64.

    Points are stored cluster by cluster: cluster ``c`` occupies rows ``c * n .. (c + 1) * n - 1``.
    ``Sigma_c = A^T A`` with ``A`` (df, dim) rows ~ N(0, V) is a Wishart(df, V) draw, and points are
    ``mu_c + A^T z`` with ``z ~ N(0, I_df)``, whose covariance is exactly ``Sigma_c``. With
    ``cov_normalize`` the covariance is ``Sigma_c / df`` (mean ``V``): tight, well separated clusters.
    """
    d, k, n, df = cfg.dim, cfg.clusters, cfg.points_per_cluster, cfg.df
    means = (torch.rand(k, d, generator=generator, dtype=DTYPE) * 2 - 1) * cfg.mean_range
    scale = cfg.scale_low + (cfg.scale_high - cfg.scale_low) * torch.rand(k, d, generator=generator, dtype=DTYPE)
    A = torch.randn(k, df, d, generator=generator, dtype=DTYPE) * scale.sqrt()[:, None, :]   # rows ~ N(0, V)
    if cfg.cov_normalize:
        A = A / math.sqrt(df)                                                                # Sigma / df
    z = torch.randn(k, n, df, generator=generator, dtype=DTYPE)
    X = means[:, None, :] + z @ A                                                            # (k, n, d)
    labels = torch.arange(k).repeat_interleave(n)
    return X.reshape(k * n, d), labels


def random_keep(n: int, dim: int, num_keep: int, generator: torch.Generator) -> Tensor:
    """(n, dim) float64 masks, 1 = kept, exactly ``num_keep`` ones per row (MAE-style argsort of noise)."""
    noise = torch.rand(n, dim, generator=generator, dtype=DTYPE)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < num_keep).to(DTYPE)


def augment(x_masked: Tensor) -> Tensor:
    """``[x~; 1]``: the bias of ``[W | b]`` acts on a constant, never-masked 1."""
    return torch.cat([x_masked, torch.ones_like(x_masked[..., :1])], dim=-1)


def sequence_partners(first: Tensor, points_per_cluster: int, clusters: int,
                      generator: torch.Generator) -> Tensor:
    """Indices of the second inputs, (3, B): rows same, similar, different (Table 1).

    ``same``: the first index itself. ``similar``: a uniformly chosen *other* point of the same cluster.
    ``different``: a uniformly chosen point of a uniformly chosen other cluster. Relies on the
    cluster-by-cluster layout of :func:`sample_clusters`.
    """
    n, k = points_per_cluster, clusters
    cluster, pos = first // n, first % n
    shift = torch.randint(1, n, first.shape, generator=generator)
    similar = cluster * n + (pos + shift) % n
    other = (cluster + torch.randint(1, k, first.shape, generator=generator)) % k
    different = other * n + torch.randint(0, n, first.shape, generator=generator)
    return torch.stack([first, similar, different])


# ------------------------------------------------------------------------------------------- gradients
def linear_grads(P: Tensor, Q: Tensor, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(grad L_r, grad L_c)`` w.r.t. ``P = [W | b]`` (Eq. 7c with the augmented input).

    P, Q: (..., dim, dim + 1) student / teacher; x, keep: (..., dim). Returns two (..., dim, dim + 1).
    """
    a = augment(x * keep)
    pred = (P @ a.unsqueeze(-1)).squeeze(-1)
    t_pred = (Q @ a.unsqueeze(-1)).squeeze(-1)
    grad_r = (pred - x).unsqueeze(-1) * a.unsqueeze(-2)
    grad_c = (pred - t_pred).unsqueeze(-1) * a.unsqueeze(-2)
    return grad_r, grad_c


def losses(P: Tensor, Q: Tensor, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(L_r, L_c)`` (Eq. 7b); the teacher's prediction is a constant (StopGrad)."""
    a = augment(x * keep)
    pred = (P @ a.unsqueeze(-1)).squeeze(-1)
    t_pred = (Q @ a.unsqueeze(-1)).squeeze(-1).detach()
    return 0.5 * ((pred - x) ** 2).sum(-1), 0.5 * ((pred - t_pred) ** 2).sum(-1)


def ema(Q: Tensor, P: Tensor, alpha: float) -> Tensor:
    """Eq. (2): ``T <- alpha T + (1 - alpha) S``."""
    return alpha * Q + (1.0 - alpha) * P


def _cos(u: Tensor, v: Tensor) -> Tensor:
    denom = u.norm(dim=-1) * v.norm(dim=-1)
    dot = (u * v).sum(-1)
    return torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot)).clamp(-1.0, 1.0)


def probe(P: Tensor, Q: Tensor, V: Tensor, x1: Tensor, keep1: Tensor, x2: Tensor, keep2: Tensor,
          cfg: LinearModelConfig) -> dict[str, Tensor]:
    """One step on the first input, one teacher update, gradients on the second (batched).

    P, Q, V: (dim, dim + 1) student, teacher and optimiser momentum buffer; x1, keep1: (B, dim) first inputs;
    x2, keep2: (T, B, dim) second inputs (one row per sequence type). Returns (T, B) tensors ``lc_norm``,
    ``lr_norm``, ``cos`` (Frobenius norms and cosine of the flattened gradients) and ``input_cos`` =
    cos(x~1, x~2). Uses that both gradients are outer products with the same right factor ``a2``:
    ``||e a^T||_F = |e| |a|`` and ``cos(e_r a^T, e_c a^T) = cos(e_r, e_c)``.
    """
    a1 = augment(x1 * keep1)                                          # (B, d+1)
    e1 = a1 @ P.T - x1 + a1 @ (P - Q).T                               # residual of grad(L_r + L_c)
    g1 = e1.unsqueeze(-1) * a1.unsqueeze(-2)                          # (B, d, d+1)
    step = g1 if cfg.probe_step == "sgd" else cfg.sgd_momentum * V + g1
    P1 = P - cfg.lr * step                                            # a copy per probe point
    Q1 = ema(Q, P1, cfg.teacher_momentum)
    a2 = augment(x2 * keep2)                                          # (T, B, d+1)
    e_r = torch.einsum("bij,tbj->tbi", P1, a2) - x2
    e_c = torch.einsum("bij,tbj->tbi", P1 - Q1, a2)
    a_norm = a2.norm(dim=-1)
    return {
        "lc_norm": e_c.norm(dim=-1) * a_norm,
        "lr_norm": e_r.norm(dim=-1) * a_norm,
        "cos": _cos(e_r, e_c),
        "input_cos": _cos((x1 * keep1).expand_as(x2), x2 * keep2),
    }


def init_student(dim: int, generator: torch.Generator) -> Tensor:
    """``[W | b]`` initialised like ``torch.nn.Linear(dim, dim)``: uniform in +-1/sqrt(dim)."""
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(dim, dim + 1, generator=generator, dtype=DTYPE) * 2 - 1) * bound


def train_step(P: Tensor, Q: Tensor, V: Tensor, x: Tensor, keep: Tensor,
               cfg: LinearModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """One SGD+momentum step on the batch mean of ``L_r + L_c``, then the EMA teacher update."""
    a = augment(x * keep)
    e = a @ P.T - x + a @ (P - Q).T
    grad = e.T @ a / x.shape[0]
    V = cfg.sgd_momentum * V + grad
    P = P - cfg.lr * V
    Q = ema(Q, P, cfg.teacher_momentum)
    return P, Q, V


def train_step_free(P: Tensor, D: Tensor, V: Tensor, x: Tensor, keep: Tensor,
                    cfg: LinearModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The same step without a teacher: ``grad L_r + D A`` (``D = S - T``, ``A`` = batch mean of ``a a^T``), then
    ``D <- alpha (D + Delta)`` (rc-mae-free's recursion for the EMA's ``S - T``)."""
    from mimkit.methods.rc_mae_free import advance_difference

    a = augment(x * keep)
    grad = (a @ P.T - x).T @ a / x.shape[0] + D @ (a.T @ a / x.shape[0])
    V = cfg.sgd_momentum * V + grad
    P_new = P - cfg.lr * V
    return P_new, advance_difference(D, P_new - P, cfg.teacher_momentum), V


def _run_seed(seed: int, run: int) -> int:
    return (int(seed) * 1_000_003 + int(run) * 7_919 + 12_345) % (2**63 - 1)


def run_one(cfg: LinearModelConfig, run: int, arm: str = "teacher", keep_weights: bool = False) -> dict[str, Tensor]:
    """One run: returns (iterations, 3) per-iteration means over the probe points of each quantity (and, with
    ``keep_weights``, ``weights``: the student after every iteration, (iterations, dim, dim + 1))."""
    if arm not in ARMS:
        raise MimkitError(f"unknown linear-model arm {arm!r}; accepted: {', '.join(ARMS)}")
    g = torch.Generator().manual_seed(_run_seed(cfg.seed, run))
    X, _ = sample_clusters(cfg, g)
    n_total = X.shape[0]
    P = init_student(cfg.dim, g)
    Q = P.clone()
    V = torch.zeros_like(P)
    D = torch.zeros_like(P)
    keys = ("lc_norm", "lr_norm", "cos", "input_cos")
    out = {k: torch.empty(cfg.iterations, len(SEQUENCE_TYPES), dtype=DTYPE) for k in keys}
    if keep_weights:
        out["weights"] = torch.empty(cfg.iterations, *P.shape, dtype=DTYPE)
    n_types = len(SEQUENCE_TYPES)
    for it in range(cfg.iterations):
        idx = torch.randint(0, n_total, (cfg.batch_size,), generator=g)
        keep = random_keep(cfg.batch_size, cfg.dim, cfg.num_keep, g)
        if arm == "teacher":
            P, Q, V = train_step(P, Q, V, X[idx], keep, cfg)
        else:
            P, D, V = train_step_free(P, D, V, X[idx], keep, cfg)
            Q = P - D
        if keep_weights:
            out["weights"][it] = P

        first = torch.randint(0, n_total, (cfg.probe_batch,), generator=g)
        second = sequence_partners(first, cfg.points_per_cluster, cfg.clusters, g)   # (3, B)
        keep1 = random_keep(cfg.probe_batch, cfg.dim, cfg.num_keep, g)
        if cfg.shared_mask:
            keep2 = keep1.expand(n_types, -1, -1)
        else:
            keep2 = random_keep(n_types * cfg.probe_batch, cfg.dim, cfg.num_keep, g).view(n_types, cfg.probe_batch, -1)
        res = probe(P, Q, V, X[first], keep1, X[second], keep2, cfg)
        for k in keys:
            out[k][it] = res[k].mean(dim=1)
    return out


def run_linear_model(cfg: LinearModelConfig, progress: Callable[[int, int], None] | None = None,
                     arm: str = "teacher") -> dict[str, np.ndarray]:
    """All runs: ``{quantity: (runs, iterations, 3) array}`` for lc_norm, lr_norm, cos, input_cos."""
    cfg.validate()
    per_run = []
    threads = torch.get_num_threads()
    # thousands of tiny matrix products: one thread avoids scheduling overhead that can be 20x the work
    torch.set_num_threads(1)
    try:
        for r in range(cfg.runs):
            per_run.append(run_one(cfg, r, arm))
            if progress is not None:
                progress(r + 1, cfg.runs)
    finally:
        torch.set_num_threads(threads)
    return {k: torch.stack([pr[k] for pr in per_run]).numpy() for k in per_run[0]}


def summarize(curves: dict[str, np.ndarray], cfg: LinearModelConfig) -> dict:
    """summary.json content: settings, per-type averages and the verdicts on the paper's trends."""
    runs, iters = curves["cos"].shape[:2]
    tail = max(1, iters // 10)
    per_type = {}
    for q in ("lc_norm", "lr_norm", "cos", "input_cos"):
        arr = curves[q]
        run_means = arr.mean(axis=1)                        # (runs, 3)
        per_type[q] = {
            t: {
                "mean": float(arr[:, :, i].mean()),
                "std_over_runs": float(run_means[:, i].std()),
                "mean_last_10pct": float(arr[:, -tail:, i].mean()),
                "mean_first_10pct": float(arr[:, :tail, i].mean()),
            }
            for i, t in enumerate(SEQUENCE_TYPES)
        }
    rows = {q: curves[q].reshape(-1, len(SEQUENCE_TYPES)) for q in ("lc_norm", "lr_norm", "cos")}
    settings = asdict(cfg)
    settings.update(wishart_df=cfg.df, num_points=cfg.clusters * cfg.points_per_cluster,
                    masked_components=cfg.dim - cfg.num_keep)
    return {
        "experiment": "linear-model",
        "paper": "rc-mae.txt Sec. 4, App. B and E.1 (Table 8), Fig. 2 (a-c)",
        "settings": settings,
        "probes": {"runs": int(runs), "iterations": int(iters), "points_per_iteration": cfg.probe_batch,
                   "fraction_unit": "one (run, iteration): means over the probe points"},
        "per_type": per_type,
        "per_probe_statistics": {q: type_statistics(v) for q, v in rows.items()},
        "verdicts": trend_verdicts(rows["lc_norm"], rows["lr_norm"], rows["cos"], near_zero=cfg.near_zero),
    }


def write_outputs(out_dir: Path, curves: dict[str, np.ndarray], cfg: LinearModelConfig,
                  free: dict[str, np.ndarray] | None = None) -> tuple[Path, Path, dict]:
    """Write ``linear_model.png`` (Fig. 2 a-c), ``summary.json`` and ``curves.npz`` into ``out_dir``; with the
    teacher-free arm's curves ``free``, they are drawn over the teacher's (dashed) and compared in the summary."""
    import json

    from mimkit.analysis.plots import save_curves_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(curves, cfg)
    if free is not None:
        diff = max(float(np.max(np.abs(free[q] - curves[q]) / (np.abs(curves[q]) + 1e-12))) for q in curves)
        summary["teacher_free"] = {"arm": "rc-mae-free: D <- alpha (D + Delta), grad L_c = D A, no teacher",
                                   "max_relative_curve_difference": diff}
    cov = f"Wishart df {cfg.df}" + (" / df" if cfg.cov_normalize else "")
    title = (f"linear model (dim {cfg.dim}, {cfg.clusters} clusters, {cov}): {cfg.runs} runs, "
             f"lr {cfg.lr:g}, SGD momentum {cfg.sgd_momentum:g}, teacher alpha {cfg.teacher_momentum:g}, "
             f"probe step {cfg.probe_step}; mean +- std over runs")
    png = save_curves_figure(curves, out_dir / "linear_model.png", title, overlay=free)
    js = out_dir / "summary.json"
    js.write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(out_dir / "curves.npz", types=np.array(SEQUENCE_TYPES), **curves,
                        **{f"free_{k}": v for k, v in (free or {}).items()})
    return png, js, summary
