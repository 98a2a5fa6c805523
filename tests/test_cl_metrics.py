"""Continual-learning metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from mempos.agent import metrics as M
from mempos.errors import UsageError

# R[i][j]: accuracy on task j after training task i. Task 0 improves after its own
# training (0.9 -> 0.95 after task 1) and then drops to 0.6: max-based forgetting
# (0.95 - 0.6) and first-vs-last (0.9 - 0.6) differ on it.
R = np.array([
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],
    [0.60, 0.70, 0.85],
])
B = np.array([0.10, 0.05, 0.15])      # untrained model
JOINT = np.array([0.92, 0.85, 0.90])  # joint-training reference

# NLL (lower is better): task 0 improves to 0.8 after task 1, then rises to 1.5.
N = np.array([
    [1.0, 3.0, 3.2],
    [0.8, 1.2, 3.1],
    [1.5, 1.4, 1.1],
])
NB = np.array([3.5, 3.4, 3.3])
NJOINT = np.array([0.9, 1.0, 1.0])


def test_accuracy_and_transfer_by_hand():
    assert M.accuracy(R) == pytest.approx((0.60 + 0.70 + 0.85) / 3)
    # BWT = mean(0.6 - 0.9, 0.7 - 0.8) = -0.2
    assert M.backward_transfer(R) == pytest.approx(-0.2)
    np.testing.assert_allclose(M.backward_transfer(R, per_task=True), [-0.3, -0.1])
    # FWT = mean(R[0][1] - b1, R[1][2] - b2) = mean(0.05, 0.15) = 0.1
    assert M.forward_transfer(R, B) == pytest.approx(0.1)
    np.testing.assert_allclose(M.forward_transfer(R, B, per_task=True), [0.05, 0.15])


def test_max_forgetting_differs_from_first_vs_last():
    # max-based: task 0: max(0.9, 0.95) - 0.6 = 0.35; task 1: max(0.1, 0.8) - 0.7 = 0.1
    np.testing.assert_allclose(M.forgetting(R, per_task=True), [0.35, 0.1])
    assert M.forgetting(R) == pytest.approx(0.225)
    # first vs last: task 0: 0.9 - 0.6 = 0.3; task 1: 0.8 - 0.7 = 0.1
    np.testing.assert_allclose(M.forgetting_first_last(R, per_task=True), [0.3, 0.1])
    assert M.forgetting_first_last(R) == pytest.approx(0.2)
    # first vs last is -BWT per task
    np.testing.assert_allclose(M.forgetting_first_last(R, per_task=True), -M.backward_transfer(R, per_task=True))


def test_intransigence_by_hand():
    # I_j = R*_j - R[j][j] = (0.02, 0.05, 0.05)
    np.testing.assert_allclose(M.intransigence(R, JOINT, per_task=True), [0.02, 0.05, 0.05])
    assert M.intransigence(R, JOINT) == pytest.approx(0.04)


def test_nll_sign_convention_positive_forgetting_means_worse():
    assert M.accuracy(N) == pytest.approx(4.0 / 3)  # mean final NLL, in NLL units
    # BWT = mean(N[j][j] - N[T-1][j]) = mean(1.0 - 1.5, 1.2 - 1.4) = -0.35 (earlier tasks got worse)
    assert M.backward_transfer(N, higher_is_better=False) == pytest.approx(-0.35)
    # FWT = mean(b_j - N[j-1][j]) = mean(3.4 - 3.0, 3.3 - 3.1) = 0.3 (training helped unseen tasks)
    assert M.forward_transfer(N, NB, higher_is_better=False) == pytest.approx(0.3)
    # forgetting = final NLL - best earlier NLL: task 0: 1.5 - 0.8 = 0.7; task 1: 1.4 - 1.2 = 0.2
    np.testing.assert_allclose(M.forgetting(N, higher_is_better=False, per_task=True), [0.7, 0.2])
    assert M.forgetting(N, higher_is_better=False) == pytest.approx(0.45)
    np.testing.assert_allclose(M.forgetting_first_last(N, higher_is_better=False, per_task=True), [0.5, 0.2])
    # intransigence = N[j][j] - joint_j = (0.1, 0.2, 0.1)
    np.testing.assert_allclose(M.intransigence(N, NJOINT, higher_is_better=False, per_task=True), [0.1, 0.2, 0.1])
    # lower-is-better on N is the same as higher-is-better on -N
    assert M.forgetting(N, higher_is_better=False) == pytest.approx(M.forgetting(-N))
    assert M.forward_transfer(N, NB, higher_is_better=False) == pytest.approx(M.forward_transfer(-N, -NB))
    assert M.intransigence(N, NJOINT, higher_is_better=False) == pytest.approx(M.intransigence(-N, -NJOINT))


def test_unused_entries_may_be_nan_and_single_task_is_nan():
    partial = R.copy()
    partial[0, 2] = np.nan  # task 2 was not evaluated after task 0; no metric needs it
    full, part = M.continual_metrics(R, B, JOINT), M.continual_metrics(partial, B, JOINT)
    for key in ("acc", "bwt", "fwt", "forgetting_max", "forgetting_first_last", "intransigence"):
        assert part[key] == pytest.approx(full[key]), key
    one = M.continual_metrics([[0.7]], [0.1])
    assert one["acc"] == 0.7 and math.isnan(one["bwt"]) and math.isnan(one["fwt"])
    assert math.isnan(one["forgetting_max"]) and one["intransigence"] is None


def test_bad_shapes_are_usage_errors():
    with pytest.raises(UsageError, match="square"):
        M.accuracy([[1.0, 2.0]])
    with pytest.raises(UsageError, match="one score per task"):
        M.forward_transfer(R, [0.1, 0.2])


def test_gradient_cosine_on_hand_vectors():
    assert M.gradient_cosine([1.0, 0.0, 0.0], [1.0, 1.0, 0.0]) == pytest.approx(1 / math.sqrt(2))
    assert M.gradient_cosine(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(-1.0)
    # per-parameter lists are flattened and concatenated: (3, 4, 0) . (4, -3, 1) = 0
    current = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0]])]
    other = [torch.tensor([4.0, -3.0]), torch.tensor([[1.0]])]
    assert M.gradient_cosine(current, other) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(M.gradient_cosine([0.0, 0.0], [1.0, 0.0]))
    with pytest.raises(UsageError, match="differ in size"):
        M.gradient_cosine([1.0, 2.0], [1.0, 2.0, 3.0])


def test_interference_summary():
    s = M.cosine_summary([0.5, -0.25, -1.0, 0.75, float("nan")])
    assert s == {"mean_cosine": pytest.approx(0.0), "negative_share": 0.5, "n": 4, "n_undefined": 1}
    out = M.interference(torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])])
    assert out["cosines"] == pytest.approx([1.0, -1 / math.sqrt(2)])
    assert out["mean_cosine"] == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    assert out["negative_share"] == 0.5
