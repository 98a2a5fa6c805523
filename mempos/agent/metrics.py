"""Continual-learning metrics over the score matrix, and gradient interference.

The score matrix
----------------
With T tasks trained in order 0, 1, ..., T-1, ``R`` is a (T, T) array:
``R[i][j]`` = score on task j after training task i (0-based). Entries a
metric does not use may be NaN (for example R[i][j] for j > i + 1 when only
seen tasks and the next one are evaluated). ``baseline[j]`` = b_j, the
untrained model's score on task j; ``joint[j]`` = R*_j, the score of the
joint-training reference (all tasks at once) on task j.

Sign convention
---------------
Every metric except ACC is computed on the "goodness" g = R when
``higher_is_better=True`` (accuracy, exact match) and g = -R when False
(NLL, perplexity), so its sign means the same for every score:

- BWT > 0: earlier tasks got better after later training; < 0: they got worse.
- FWT > 0: training on earlier tasks helped an unseen task, relative to b_j.
- forgetting > 0: the task got worse (for NLL: its NLL went up).
- intransigence > 0: the task was learnt worse than the joint reference.

ACC stays in the score's own units (mean final accuracy, or mean final NLL).

Definitions (j indexes tasks, means are over the j listed)
----------------------------------------------------------
- ACC = mean_{j=0..T-1} R[T-1][j]
- BWT = mean_{j<T-1} (g[T-1][j] - g[j][j])                  (Lopez-Paz & Ranzato, 2017)
- FWT = mean_{j>=1} (g[j-1][j] - gb_j)                      (Lopez-Paz & Ranzato, 2017)
- forgetting (max-based) f_j = max_{l<T-1} g[l][j] - g[T-1][j], j < T-1
                                                            (Chaudhry et al., 2018; the max runs
                                                            over every l < T-1, as in the paper,
                                                            skipping NaN entries)
- forgetting (first-vs-last) = g[j][j] - g[T-1][j], j < T-1 (Avalanche's "forgetting": the score
                                                            right after training the task minus
                                                            the last one; equals -BWT per task)
- intransigence I_j = g*_j - g[j][j], j = 0..T-1            (Chaudhry et al., 2018)

A metric with no task to average over (T = 1 for BWT, FWT and forgetting)
is NaN.

Gradient interference
---------------------
`gradient_cosine(g_current, g_other)`: cosine between two gradients, each
a tensor/array or a list of per-parameter tensors (flattened and
concatenated in order), computed in float64. NaN when either is all zero.
`cosine_summary` reports the mean cosine and the share of negative ones
(strictly below 0; negative = the update on the current task would raise
the other task's loss to first order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mempos.errors import UsageError

NAN = float("nan")


def _matrix(R) -> np.ndarray:
    try:
        m = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the score matrix must be numeric: {exc}") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise UsageError(f"the score matrix must be square (T, T) with T >= 1, got shape {m.shape}")
    return m


def _vector(v, T: int, name: str) -> np.ndarray:
    try:
        out = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} must be numeric: {exc}") from None
    if out.shape != (T,):
        raise UsageError(f"{name} must have one score per task ({T}), got shape {out.shape}")
    return out


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else NAN


def _result(values: np.ndarray, per_task: bool):
    return values if per_task else _mean(values)


def accuracy(R) -> float:
    """ACC: mean final score over all tasks, in the score's own units."""
    return float(_matrix(R)[-1].mean())


def backward_transfer(R, higher_is_better: bool = True, per_task: bool = False):
    """BWT = mean_{j<T-1} (g[T-1][j] - g[j][j]); positive = earlier tasks improved."""
    g = _sign(higher_is_better) * _matrix(R)
    T = len(g)
    j = np.arange(T - 1)
    return _result(g[T - 1, j] - g[j, j], per_task)


def forward_transfer(R, baseline, higher_is_better: bool = True, per_task: bool = False):
    """FWT = mean_{j>=1} (g[j-1][j] - g_b[j]); positive = earlier training helped unseen tasks."""
    s = _sign(higher_is_better)
    g = s * _matrix(R)
    gb = s * _vector(baseline, len(g), "baseline")
    j = np.arange(1, len(g))
    return _result(g[j - 1, j] - gb[j], per_task)


def forgetting(R, higher_is_better: bool = True, per_task: bool = False):
    """Chaudhry et al. (2018): f_j = max_{l<T-1} g[l][j] - g[T-1][j] for j < T-1; positive = got worse."""
    g = _sign(higher_is_better) * _matrix(R)
    T = len(g)
    out = np.full(T - 1, NAN)
    for j in range(T - 1):
        column = g[: T - 1, j]
        column = column[~np.isnan(column)]
        if column.size:
            out[j] = column.max() - g[T - 1, j]
    return _result(out, per_task)


def forgetting_first_last(R, higher_is_better: bool = True, per_task: bool = False):
    """Avalanche-style forgetting, first vs last: g[j][j] - g[T-1][j] for j < T-1; positive = got worse."""
    g = _sign(higher_is_better) * _matrix(R)
    T = len(g)
    j = np.arange(T - 1)
    return _result(g[j, j] - g[T - 1, j], per_task)


def intransigence(R, joint, higher_is_better: bool = True, per_task: bool = False):
    """Chaudhry et al. (2018): I_j = g*_j - g[j][j] over all tasks; positive = learnt worse than joint."""
    s = _sign(higher_is_better)
    g = s * _matrix(R)
    gj = s * _vector(joint, len(g), "joint")
    j = np.arange(len(g))
    return _result(gj - g[j, j], per_task)


def continual_metrics(R, baseline=None, joint=None, higher_is_better: bool = True) -> dict:
    """Every score-matrix metric with its label; FWT needs `baseline`, intransigence `joint` (else None)."""
    R = _matrix(R)
    return {
        "acc": accuracy(R),
        "bwt": backward_transfer(R, higher_is_better),
        "fwt": None if baseline is None else forward_transfer(R, baseline, higher_is_better),
        "forgetting_max": forgetting(R, higher_is_better),
        "forgetting_first_last": forgetting_first_last(R, higher_is_better),
        "intransigence": None if joint is None else intransigence(R, joint, higher_is_better),
        "higher_is_better": bool(higher_is_better),
        "labels": {
            "acc": "mean final score over all tasks (score units)",
            "bwt": "backward transfer, Lopez-Paz & Ranzato 2017 (>0: earlier tasks improved)",
            "fwt": "forward transfer vs the untrained model, Lopez-Paz & Ranzato 2017",
            "forgetting_max": "forgetting, Chaudhry et al. 2018: best earlier score minus final (>0: worse)",
            "forgetting_first_last": "forgetting, Avalanche style: score right after training minus final",
            "intransigence": "intransigence, Chaudhry et al. 2018: joint reference minus score after training",
        },
    }


def _flat(g) -> np.ndarray:
    """One float64 vector from a tensor, an array or a sequence of per-parameter tensors/arrays."""
    if hasattr(g, "detach"):
        import torch

        return g.detach().reshape(-1).to(torch.float64).cpu().numpy()
    if isinstance(g, np.ndarray):
        return g.astype(np.float64).reshape(-1)
    if isinstance(g, (list, tuple)) and g and all(hasattr(p, "detach") or isinstance(p, np.ndarray) for p in g):
        return np.concatenate([_flat(p) for p in g])
    try:
        return np.asarray(g, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"a gradient must be a tensor, an array or a list of them: {exc}") from None


def gradient_cosine(g_current, g_other) -> float:
    """Cosine between two flattened gradients (float64); NaN when either is all zero."""
    a, b = _flat(g_current), _flat(g_other)
    if a.shape != b.shape:
        raise UsageError(f"gradients differ in size: {a.size} vs {b.size} elements")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise UsageError("gradients contain NaN or infinite values")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return NAN
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def cosine_summary(cosines: Iterable[float]) -> dict:
    """{"mean_cosine", "negative_share", "n", "n_undefined"} over defined (non-NaN) cosines."""
    values = np.asarray(list(cosines), dtype=np.float64).reshape(-1)
    defined = values[~np.isnan(values)]
    return {
        "mean_cosine": _mean(defined),
        "negative_share": float((defined < 0).mean()) if defined.size else NAN,
        "n": int(defined.size),
        "n_undefined": int(values.size - defined.size),
    }


def interference(g_current, g_others: Sequence) -> dict:
    """Cosine of the current gradient with each of `g_others`, and their summary."""
    cosines = [gradient_cosine(g_current, g) for g in g_others]
    return {"cosines": cosines, **cosine_summary(cosines)}
