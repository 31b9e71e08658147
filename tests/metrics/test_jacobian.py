"""Tests of SDlogJ and folding (monai_unireg.metrics.jacobian)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from monai_unireg.metrics import JacobianMetric, folding_percentage, sdlogj
from monai_unireg.metrics.field import jacobian_statistics
from monai_unireg.metrics.jacobian import cropped_determinant
from monai_unireg.spatial import identity_grid

SHAPE = (16, 20, 24)
BOX = (slice(None), slice(6, 12), slice(8, 14))  # (axis-1, axis-2) columns where the field folds


def _l2r_reference(disp: np.ndarray) -> tuple[float, np.ndarray]:
    """Learn2Reg evaluation recipe written out with scipy: [-0.5, 0, 0.5] kernel, zero padding, crop 2, "+3"."""
    kernel = np.array([-0.5, 0.0, 0.5])
    grad = np.stack(
        [np.stack([ndimage.correlate1d(disp[c], kernel, axis=a, mode="constant") for a in range(3)]) for c in range(3)]
    )
    jac = (grad + np.eye(3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std()), det


def _smooth_field(generator: torch.Generator, amplitude: float) -> torch.Tensor:
    coarse = torch.randn((2, 3, 5, 5, 5), generator=generator, dtype=torch.float64) * amplitude
    return F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)


def _affine_field(matrix: list[list[float]]) -> torch.Tensor:
    """``u(x) = (A - I) x`` in voxels, ``[1, 3, *SHAPE]`` float64: its Jacobian is ``A`` at every voxel."""
    a = torch.tensor(matrix, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    grid = identity_grid(SHAPE, dtype=torch.float64)
    return torch.einsum("ij,j...->i...", a, grid).unsqueeze(0)


def _folding_field() -> torch.Tensor:
    """``u_0 = -2 x_0`` on the BOX columns, 0 elsewhere: det = 1 + du_0/dx_0 = -1 on BOX, 1 elsewhere."""
    ddf = torch.zeros((1, 3) + SHAPE, dtype=torch.float64)
    x0 = identity_grid(SHAPE, dtype=torch.float64)[0]
    ddf[(0, 0) + BOX] = -2.0 * x0[BOX]
    return ddf


def test_identity_is_regular() -> None:
    ddf = torch.zeros((2, 3) + SHAPE)
    for mode in ("l2r", "exact"):
        assert torch.equal(sdlogj(ddf, mode=mode), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(folding_percentage(ddf), torch.zeros(2, dtype=torch.float64))


def test_affine_field_has_constant_determinant() -> None:
    matrix = [[1.1, 0.2, 0.0], [0.1, 0.9, 0.05], [0.0, -0.1, 1.2]]
    ddf = _affine_field(matrix)
    det = cropped_determinant(ddf, crop=0)
    assert torch.allclose(det, torch.full_like(det, float(np.linalg.det(matrix))), atol=1e-12)
    for mode in ("l2r", "exact"):
        assert sdlogj(ddf, mode=mode).item() == pytest.approx(0.0, abs=1e-12)
    assert folding_percentage(ddf).item() == 0.0


def test_reflection_folds_everywhere() -> None:
    ddf = _affine_field([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert folding_percentage(ddf).item() == 100.0
    assert torch.isnan(sdlogj(ddf, mode="exact")).item()
    assert sdlogj(ddf, mode="l2r").item() == pytest.approx(0.0, abs=1e-12)


def test_constructed_folding_count() -> None:
    ddf = _folding_field()
    interior = (SHAPE[0] - 4) * (SHAPE[1] - 4) * (SHAPE[2] - 4)
    folded = (SHAPE[0] - 4) * 6 * 6
    p = folded / interior
    assert folding_percentage(ddf).item() == pytest.approx(100.0 * p)
    assert folding_percentage(ddf, crop=0).item() == pytest.approx(100.0 * SHAPE[0] * 36 / math.prod(SHAPE))
    # "+3" convention: log(-1 + 3) on the folded voxels, log(1 + 3) elsewhere.
    assert sdlogj(ddf).item() == pytest.approx(math.log(2.0) * math.sqrt(p * (1 - p)), rel=1e-12)
    # exact convention: only det = 1 voxels count.
    assert sdlogj(ddf, mode="exact").item() == pytest.approx(0.0, abs=1e-12)


def test_l2r_mode_matches_reference_recipe(generator: torch.Generator) -> None:
    ddf = _smooth_field(generator, amplitude=4.0)
    ours = sdlogj(ddf)
    folding = folding_percentage(ddf)
    for b in range(2):
        expected, det = _l2r_reference(ddf[b].numpy())
        assert (det <= 0).any() and (det > 0).any()  # the field folds somewhere: clipping and masking are exercised
        assert ours[b].item() == pytest.approx(expected, rel=1e-10)
        assert folding[b].item() == pytest.approx(100.0 * (det <= 0).mean(), rel=1e-12)
        positive = det[det > 0]
        assert sdlogj(ddf[b : b + 1], mode="exact").item() == pytest.approx(np.log(positive).std(), rel=1e-10)


def test_metric_accumulates_batches(generator: torch.Generator) -> None:
    metric = JacobianMetric()
    first = metric(torch.cat([torch.zeros((1, 3) + SHAPE, dtype=torch.float64), _folding_field()]))
    assert first.shape == (2, 2) and first.dtype == torch.float32
    assert torch.equal(first[0], torch.zeros(2))
    assert first[1, 1].item() == pytest.approx(folding_percentage(_folding_field()).item(), rel=1e-6)
    second = metric([f for f in _smooth_field(generator, amplitude=1.0)])  # list of channel-first fields
    assert second.shape == (2, 2)
    table = torch.cat([first, second])
    result = metric.aggregate()
    assert set(result) == {"sdlogj", "folding_percent"}
    assert result["sdlogj"].item() == pytest.approx(table[:, 0].mean().item(), rel=1e-6)
    assert result["folding_percent"].item() == pytest.approx(table[:, 1].mean().item(), rel=1e-6)
    assert torch.equal(metric.aggregate("none")["sdlogj"], table[:, 0])


def test_two_dimensional_field() -> None:
    ddf = torch.zeros(1, 2, 12, 12)
    ddf[0, 1] = -2.0 * torch.arange(12.0)  # u_1 = -2 x_1: det = -1 everywhere
    assert folding_percentage(ddf).item() == 100.0


@pytest.mark.parametrize(
    "ddf, kwargs, match",
    [
        (torch.zeros(3, 16, 16, 16), {}, "ddf"),
        (torch.zeros(1, 3, 16, 16), {}, "ddf must have 2 channels"),
        (torch.full((1, 3, 8, 8, 8), float("nan")), {}, "ddf contains NaN"),
        (torch.zeros(1, 3, 8, 8, 8, dtype=torch.int64), {}, "ddf must be a floating"),
        ([torch.zeros(1, 3, 8, 8, 8)], {}, "ddf"),
        (torch.zeros(1, 3, 8, 8, 8), {"mode": "log"}, "mode"),
        (torch.zeros(1, 3, 8, 8, 8), {"crop": -1}, "crop"),
        (torch.zeros(1, 3, 8, 8, 8), {"crop": 4}, "crop"),
        (torch.zeros(1, 3, 8, 8, 8), {"crop": 1.5}, "crop"),
    ],
)
def test_bad_input_raises(ddf: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sdlogj(ddf, **kwargs)


def test_bad_metric_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        JacobianMetric(mode="plain")
    with pytest.raises(ValueError, match="reduction"):
        JacobianMetric(reduction="mean_batch")
    with pytest.raises(ValueError, match="no results"):
        JacobianMetric().aggregate()
    with pytest.raises(ValueError, match="y must be None"):
        JacobianMetric()(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8))


def test_functional_statistics_are_the_metrics(generator: torch.Generator) -> None:
    # the command line evaluates with jacobian_statistics (no MONAI import): the same values as one metric call
    ddf = torch.randn(2, 3, 10, 11, 12, generator=generator) * 0.8
    for mode in ("l2r", "exact"):
        assert torch.equal(jacobian_statistics(ddf, mode), JacobianMetric(mode=mode)(ddf).as_subclass(torch.Tensor))
