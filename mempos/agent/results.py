"""One run's numbers summarised with `mempos.agent.metrics`, for EM and for NLL.

Exact match is defined only for "qa" tasks, so the EM matrices have NaN
columns where a task is language modelling. Every metric is therefore taken
per task from `mempos.agent.metrics` (its ``per_task=True`` form) and
averaged over the tasks where it is defined; with no NaN column this is
exactly `continual_metrics` (the tests check it). ACC is the mean of the
final row over the same tasks.

A joint-training run has only its final row (it has no task boundaries):
its summary is ACC, and that row is the reference R* for the intransigence
of the other runs of the same seed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import metrics as M

SCORES = {"em": True, "nll": False}  # score -> higher is better
LABELS = {
    "acc": "ACC: mean final score (score units)",
    "bwt": "BWT, Lopez-Paz & Ranzato 2017: mean (final - right after training); >0 earlier tasks improved",
    "fwt": "FWT, Lopez-Paz & Ranzato 2017: mean (before training task j - untrained model); >0 helped",
    "forgetting_max": "forgetting, Chaudhry et al. 2018: best earlier score - final; >0 got worse",
    "forgetting_first_last": "forgetting, Avalanche style (first vs last): right after training - final; >0 worse",
    "intransigence": "intransigence, Chaudhry et al. 2018: joint reference - right after training; >0 worse",
}


def nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def score_summary(R, baseline=None, joint=None, higher_is_better: bool = True) -> dict:
    """ACC, BWT, FWT, forgetting (both), intransigence: means over defined tasks, and per task."""
    R = np.asarray(R, dtype=np.float64)
    out: dict = {"acc": nanmean(R[-1]), "per_task": {"final": R[-1].tolist()}}
    if len(R) > 1 and np.isnan(R[:-1]).all():  # joint: no task boundaries, only the final row
        return out
    per_task = {
        "bwt": M.backward_transfer(R, higher_is_better, per_task=True),
        "forgetting_max": M.forgetting(R, higher_is_better, per_task=True),
        "forgetting_first_last": M.forgetting_first_last(R, higher_is_better, per_task=True),
    }
    if baseline is not None:
        per_task["fwt"] = M.forward_transfer(R, np.asarray(baseline, dtype=np.float64), higher_is_better,
                                             per_task=True)
    if joint is not None:
        per_task["intransigence"] = M.intransigence(R, np.asarray(joint, dtype=np.float64), higher_is_better,
                                                    per_task=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for key, values in per_task.items():
            out[key] = nanmean(values)
            out["per_task"][key] = np.asarray(values).tolist()
    return out


def interference_summary(series: list[dict]) -> dict:
    """Over every measurement: mean cosine, share of negative cosines, mean held-out loss change."""
    cosines = [c for entry in series for c in entry["cosines"].values()]
    cosines = [math.nan if c is None else c for c in cosines]
    summary = M.cosine_summary(cosines)
    changes = [v for entry in series for v in entry["loss_change"].values() if v is not None]
    summary["mean_loss_change"] = float(np.mean(changes)) if changes else math.nan
    summary["measurements"] = len(series)
    return summary


def summarise(run: dict, joint_final: dict | None = None) -> dict:
    """{"em": ..., "nll": ..., "interference": ...} for one run's metrics (see `ContinualRun.metrics`).

    `joint_final` = {"em": [...], "nll": [...]}: the joint run's final scores, for intransigence.
    """
    out = {}
    for score, higher in SCORES.items():
        R = np.asarray(run["R"][score], dtype=np.float64)
        if np.isnan(R[-1]).all():
            continue  # e.g. exact match with only language-modelling tasks
        joint = None if joint_final is None else joint_final[score]
        out[score] = score_summary(R, run["baseline"][score], joint, higher)
    out["interference"] = interference_summary(run["interference"])
    return out
