"""Tests of the HD95 metric in millimetres (monai_unireg.metrics.surface)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric

from monai_unireg.metrics import HD95Metric, label_hausdorff_distance, spacing_from_affine

SHIFT = 2


def _plate_pair(axis: int, spatial_dims: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A plate 8 voxels thick along ``axis`` and 40 wide along the others, and the plate shifted by SHIFT along
    ``axis``. Every surface voxel of one has a surface voxel of the other exactly SHIFT voxels away along
    ``axis`` and none farther, and the >40 % of surface voxels inside the two large faces are exactly that far,
    so both directed 95th percentiles equal SHIFT * spacing[axis]."""
    shape = (20,) + (48,) * (spatial_dims - 1)
    y = torch.zeros((1, 1) + shape, dtype=torch.int64)
    lateral = (slice(4, 44),) * (spatial_dims - 1)
    y[(0, 0, slice(4, 12)) + lateral] = 1
    y_pred = torch.roll(y, SHIFT, dims=2)
    order = list(range(2, 2 + spatial_dims))
    order[0], order[axis] = order[axis], order[0]
    return y_pred.permute(0, 1, *order), y.permute(0, 1, *order)


def _blobs(generator: torch.Generator, shape: tuple[int, ...] = (32, 28, 36), n: int = 4) -> torch.Tensor:
    """``[1, 1, *shape]`` label map of ``n`` smooth random regions (labels 1..n) over background."""
    noise = torch.randn((1, n + 1) + tuple(max(s // 6, 2) for s in shape), generator=generator)
    smooth = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)
    return smooth.argmax(dim=1, keepdim=True)


def _monai_hd(y_pred: torch.Tensor, y: torch.Tensor, n: int, spacing, percentile: float | None) -> torch.Tensor:
    one_hot = lambda x: F.one_hot(x[:, 0], n + 1).movedim(-1, 1).float()  # noqa: E731
    metric = HausdorffDistanceMetric(include_background=False, percentile=percentile, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(one_hot(y_pred), one_hot(y), spacing=spacing)


def test_identity_gives_zero(generator: torch.Generator) -> None:
    y = _blobs(generator)
    assert torch.equal(HD95Metric(spacing=(1.5, 1.0, 2.5))(y.clone(), y), torch.zeros(1, 4))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_plate_gives_shift_times_spacing(axis: int) -> None:
    y_pred, y = _plate_pair(axis)
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.5
    table = HD95Metric(spacing=spacing)(y_pred, y)
    assert table.item() == pytest.approx(SHIFT * 2.5, abs=1e-5)


@pytest.mark.parametrize("value, background", [(70_000, 0), (3, -1)])  # labels renumbered before find_objects
def test_any_label_values(value: int, background: int) -> None:
    y_pred, y = _plate_pair(0)
    recode = lambda x: torch.where(x == 1, value, background)  # noqa: E731
    table = label_hausdorff_distance(recode(y_pred), recode(y), labels=[value], spacing=(2.5, 1.0, 1.0))
    assert table.item() == pytest.approx(SHIFT * 2.5, abs=1e-5)


def test_shifted_plate_2d() -> None:
    y_pred, y = _plate_pair(1, spatial_dims=2)
    assert label_hausdorff_distance(y_pred, y, spacing=(1.0, 0.7)).item() == pytest.approx(SHIFT * 0.7, abs=1e-5)


@pytest.mark.parametrize("percentile", [95.0, 100.0, 50.0])
def test_matches_monai_at_anisotropic_spacing(generator: torch.Generator, percentile: float) -> None:
    y = _blobs(generator)
    y_pred = _blobs(generator)
    spacing = (1.5, 1.0, 2.5)
    ours = label_hausdorff_distance(y_pred, y, labels=[1, 2, 3, 4], spacing=spacing, percentile=percentile)
    theirs = _monai_hd(y_pred, y, 4, spacing, None if percentile == 100.0 else percentile)
    assert ours.min() > 0
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_absent_and_one_sided_labels(generator: torch.Generator) -> None:
    y = _blobs(generator, n=2)
    shifted = torch.roll(y, 1, dims=2)
    y_pred = torch.where(shifted == 2, 0, shifted)
    assert torch.isinf(label_hausdorff_distance(y_pred, y, labels=[1, 2])[0, 1])
    metric = HD95Metric(labels=[1, 2, 3], spacing=1.0)
    with pytest.warns(UserWarning, match=r"\(0, 2\)"):
        table = metric(y_pred, y)
    assert table[0, 0] > 0 and torch.isnan(table[0, 1:]).all()
    assert metric.aggregate().item() == pytest.approx(table[0, 0].item())
    with pytest.warns(UserWarning, match="only one"):
        penalised = HD95Metric(labels=[1, 2, 3], spacing=1.0, missing_value=99.0)(y_pred, y)
    assert penalised[0, 1].item() == 99.0 and torch.isnan(penalised[0, 2])


def test_spacing_precedence_and_meta_tensor() -> None:
    y_pred, y = _plate_pair(0)
    c, s = math.cos(0.3), math.sin(0.3)
    rotation = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, c, -s, 0.0], [0.0, s, c, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    affine = rotation @ torch.diag(torch.tensor([2.5, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert np.allclose(spacing_from_affine(affine), [2.5, 1.0, 1.0])
    y_meta = MetaTensor(y, affine=affine)
    assert HD95Metric()(y_pred, y_meta).item() == pytest.approx(5.0, abs=1e-5)
    assert HD95Metric(spacing=(1.0, 1.0, 1.0))(y_pred, y_meta).item() == pytest.approx(2.0, abs=1e-5)
    assert HD95Metric(spacing=(1.0, 1.0, 1.0))(y_pred, y_meta, spacing=3.0).item() == pytest.approx(6.0, abs=1e-5)
    with pytest.warns(UserWarning, match="voxels"):
        assert HD95Metric()(y_pred, y).item() == pytest.approx(2.0, abs=1e-5)


def test_per_sample_spacing() -> None:
    y_pred, y = _plate_pair(0)
    table = HD95Metric()(y_pred.repeat(2, 1, 1, 1, 1), y.repeat(2, 1, 1, 1, 1), spacing=[[2.5, 1, 1], [0.5, 1, 1]])
    assert torch.allclose(table, torch.tensor([[5.0], [1.0]]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing": -1.0}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": [[1.0, 1.0, 1.0]]}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"percentile": 120.0}, "percentile"),
        ({"labels": [1, 1]}, "labels"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    y_pred, y = _plate_pair(0)
    with pytest.raises(ValueError, match=match):
        label_hausdorff_distance(y_pred.repeat(2, 1, 1, 1, 1), y.repeat(2, 1, 1, 1, 1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"missing_value": -1.0}, "missing_value"),
        ({"spacing": [[1.0, 1.0, 1.0]]}, "spacing"),
        ({"reduction": "x"}, "reduction"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HD95Metric(**kwargs)


def test_bad_maps() -> None:
    metric = HD95Metric(spacing=1.0)
    with pytest.raises(ValueError, match="y_pred"):
        metric(torch.ones(1, 8, 8, 8), torch.ones(1, 8, 8, 8))
    with pytest.raises(ValueError, match="y_pred must hold integer"):
        metric(torch.full((1, 1, 8, 8, 8), 0.5), torch.ones(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="y"):
        metric(torch.ones(1, 1, 8, 8, 8))


def test_brainsynth_pair_matches_monai(shared_data: Path) -> None:
    """HD95 in mm of two real subjects' label maps (2 mm voxels) agrees with MONAI on a few labels."""
    dataset = shared_data / "BrainSynth"
    meta = json.loads((dataset / "BrainSynth_dataset.json").read_text())
    pair = meta["registration_val"][0]
    read = lambda p: torch.from_numpy(  # noqa: E731
        np.asarray(nib.load(dataset / p.replace("/imagesTr/", "/labelsTr/")).dataobj).astype(np.int64)
    )[None, None]
    fixed, moving = read(pair["fixed"]), read(pair["moving"])
    labels = [4, 10, 17, 43, 53]
    remap = lambda x: sum((x == lab).long() * (i + 1) for i, lab in enumerate(labels))  # noqa: E731
    ours = HD95Metric(labels=labels, spacing=meta["spacing_mm"])(moving, fixed)
    theirs = _monai_hd(remap(moving), remap(fixed), len(labels), meta["spacing_mm"], 95.0)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert bool((ours > 0).all())
