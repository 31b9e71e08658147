"""Tests of the per-label Dice metric (monai_unireg.metrics.dice)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_unireg.metrics import LabelDiceMetric, label_dice, reduce_label_metric
from monai_unireg.metrics.labels import label_indices

SHAPE = (24, 24, 24)


def _boxes(*boxes: tuple[int, tuple[slice, ...]]) -> torch.Tensor:
    """A ``[1, 1, *SHAPE]`` label map with ``label`` written in each ``box``."""
    x = torch.zeros((1, 1) + SHAPE, dtype=torch.int64)
    for label, box in boxes:
        x[(0, 0) + box] = label
    return x


def _numpy_dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    pa, pb = a == label, b == label
    total = pa.sum() + pb.sum()
    return float("nan") if total == 0 else 2.0 * np.logical_and(pa, pb).sum() / total


@pytest.fixture
def overlap_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1: 8^3 boxes shifted by 2 along axis 0 (Dice 0.75); label 2: 6^3 boxes shifted by 3 along axis 2 (0.5)."""
    y = _boxes((1, (slice(2, 10), slice(2, 10), slice(2, 10))), (2, (slice(14, 20), slice(14, 20), slice(12, 18))))
    y_pred = _boxes((1, (slice(4, 12), slice(2, 10), slice(2, 10))), (2, (slice(14, 20), slice(14, 20), slice(15, 21))))
    return y_pred, y


def test_identity_gives_one(generator: torch.Generator) -> None:
    y = torch.randint(0, 6, (2, 1) + SHAPE, generator=generator)
    table = LabelDiceMetric()(y.clone(), y)
    assert table.shape == (2, 5)
    assert torch.equal(table, torch.ones(2, 5))


def test_known_overlap_of_two_boxes(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    metric = LabelDiceMetric(labels=[1, 2])
    table = metric(y_pred, y)
    assert torch.allclose(table, torch.tensor([[0.75, 0.5]]))
    assert metric.aggregate().item() == pytest.approx(0.625)


def test_reductions_over_batches(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    metric = LabelDiceMetric(labels=[1, 2])
    metric(y_pred, y)
    metric(y.clone(), y)  # second pair: identity, Dice 1 for both labels
    assert torch.allclose(metric.aggregate("none"), torch.tensor([[0.75, 0.5], [1.0, 1.0]]))
    assert torch.allclose(metric.aggregate("mean_channel"), torch.tensor([0.625, 1.0]))
    assert torch.allclose(metric.aggregate("mean_batch"), torch.tensor([0.875, 0.75]))
    assert metric.aggregate().item() == pytest.approx(0.8125)
    metric.reset()
    with pytest.raises(ValueError, match="no results"):
        metric.aggregate()


def test_absent_label_skipped_or_zero(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    skipped = LabelDiceMetric(labels=[1, 2, 3])
    table = skipped(y_pred, y)
    assert torch.isnan(table[0, 2]) and not torch.isnan(table[0, :2]).any()
    assert skipped.aggregate().item() == pytest.approx(0.625)
    assert skipped.aggregate("mean_batch")[2].isnan()
    zero = LabelDiceMetric(labels=[1, 2, 3], absent_as_zero=True)
    assert torch.allclose(zero(y_pred, y), torch.tensor([[0.75, 0.5, 0.0]]))
    assert zero.aggregate().item() == pytest.approx(1.25 / 3)


def test_label_in_one_map_only_is_zero(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    y_pred = y_pred.clone()
    y_pred[0, 0, 0, 0, 0] = 3
    assert LabelDiceMetric(labels=[3])(y_pred, y).item() == 0.0
    assert LabelDiceMetric(labels=[3], absent_as_zero=True)(y_pred, y).item() == 0.0


def test_matches_numpy_for_any_batch_and_label_order(generator: torch.Generator) -> None:
    y = torch.randint(0, 5, (3, 1) + SHAPE, generator=generator)
    y_pred = torch.randint(0, 7, (3, 1) + SHAPE, generator=generator)  # 5, 6 are not evaluated
    labels = [4, 1, 3, 2]
    table = label_dice(y_pred.float(), y.to(torch.int16), labels)
    expected = [[_numpy_dice(p.numpy(), t.numpy(), lab) for lab in labels] for p, t in zip(y_pred, y)]
    assert torch.allclose(table, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("values", [[4, 1, 3, 2], [3, 5_000_000, -2]])  # lookup table / sorted search
def test_label_indices(generator: torch.Generator, values: list[int]) -> None:
    pool = torch.tensor(values + [0, 7])
    x = pool[torch.randint(0, len(pool), (5, 6, 7), generator=generator)]
    expected = torch.zeros_like(x)
    for column, value in enumerate(values):
        expected[x == value] = column + 1
    assert torch.equal(label_indices(x, torch.tensor(values)), expected)


def test_list_of_channel_first_maps(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    metric = LabelDiceMetric(labels=[1, 2])
    table = metric([y_pred[0], y[0]], [y[0], y[0]])
    assert torch.allclose(table, torch.tensor([[0.75, 0.5], [1.0, 1.0]]))


def test_labels_inferred_from_fixed_map(overlap_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    y_pred, y = overlap_pair
    y_pred = y_pred.clone()
    y_pred[0, 0, 0, 0, 0] = 7  # only in the moving labels: not a column
    metric = LabelDiceMetric()
    assert metric.label_values is None
    assert metric(y_pred, y).shape == (1, 2)
    assert metric.label_values == (1, 2)
    only_one = y.clone()
    only_one[only_one == 2] = 0
    assert torch.isnan(metric(only_one, only_one)[0, 1])  # a later case may lack a label: skipped
    with pytest.raises(ValueError, match="labels"):
        metric(y_pred, torch.where(y == 2, 5, y))
    metric.reset()
    assert metric.label_values is None


@pytest.mark.parametrize(
    "y_pred, y, match",
    [
        (torch.ones(2, 8, 8, 8), torch.ones(2, 8, 8, 8), "y_pred"),
        (torch.ones(2, 1, 8, 8, 8), torch.ones(2, 1, 8, 8, 7), "y_pred and y"),
        (torch.ones(2, 1, 8, 8, 8), torch.full((2, 1, 8, 8, 8), float("nan")), "y contains NaN"),
        (torch.ones(2, 1, 8, 8, 8), torch.full((2, 1, 8, 8, 8), float("inf")), "y contains NaN or Inf"),
        (torch.full((2, 1, 8, 8, 8), 1.5), torch.ones(2, 1, 8, 8, 8), "y_pred must hold integer"),
        (torch.ones(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8), "y is empty"),
        (np.ones((2, 1, 8, 8, 8)), torch.ones(2, 1, 8, 8, 8), "y_pred"),
    ],
)
def test_bad_input_raises(y_pred: torch.Tensor, y: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        label_dice(y_pred, y, [1])


@pytest.mark.parametrize("kwargs", [{"labels": []}, {"labels": [1, 1]}, {"labels": [1.5]}, {"labels": "12"}])
def test_bad_labels_argument(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="labels"):
        LabelDiceMetric(**kwargs)


def test_bad_reduction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        LabelDiceMetric(reduction="median")
    with pytest.raises(ValueError, match="reduction"):
        reduce_label_metric(torch.ones(2, 2), "sum")


def test_brainsynth_pair_matches_numpy(shared_data: Path) -> None:
    """Dice of two real subjects' label maps (identity field) equals a direct numpy count, label by label."""
    dataset = shared_data / "BrainSynth"
    meta = json.loads((dataset / "BrainSynth_dataset.json").read_text())
    pair = meta["registration_val"][0]
    read = lambda p: np.asarray(nib.load(dataset / p.replace("/imagesTr/", "/labelsTr/")).dataobj)  # noqa: E731
    fixed, moving = read(pair["fixed"]), read(pair["moving"])
    labels = meta["evaluation_labels"]
    metric = LabelDiceMetric(labels=labels)
    table = metric(torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None])[0]
    expected = torch.tensor([_numpy_dice(moving, fixed, lab) for lab in labels], dtype=torch.float32)
    assert torch.allclose(table, expected, equal_nan=True)
    finite = table[~torch.isnan(table)]
    assert len(finite) > 20 and bool(((finite >= 0) & (finite <= 1)).all())
    assert 0.0 < metric.aggregate().item() < 1.0
