"""SACB-Net's training objective: its terms against independent computations (the training itself is
``bundles/sacbnet/configs/train.yaml``, tested in tests/bundles)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg import spatial
from monai_unireg.engines import SACBNET_LAMBDAS, SACBNetObjective
from monai_unireg.losses import DiffusionLoss, diffusion_regularisation, soft_dice_loss


class FixedField(nn.Module):
    """A 'network' returning a given field (a parameter, so gradients reach it)."""

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.ddf = nn.Parameter(ddf.clone())

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.ddf


def box_lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean(lncc^2)`` with a ``window^3`` box mean (zero padding) by a 3D convolution, eps on each variance."""
    kernel = torch.full((1, 1, window, window, window), 1.0 / window**3, dtype=a.dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, kernel, padding=window // 2)

    var_a = (mean(a * a) - mean(a) ** 2).clamp_min(0)
    var_b = (mean(b * b) - mean(b) ** 2).clamp_min(0)
    lncc = (mean(a * b) - mean(a) * mean(b)) / torch.sqrt((var_a + eps) * (var_b + eps))
    return 1 - (lncc**2).mean()


def reference_code_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9) -> torch.Tensor:
    """The reference code's (VoxelMorph) NCC: ``-mean(cross^2 / (var_a var_b + 1e-5))`` on window sums."""
    ones = torch.ones(1, 1, window, window, window, dtype=a.dtype)
    size = window**3

    def total(x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, ones, padding=window // 2)

    sum_a, sum_b = total(a), total(b)
    mean_a, mean_b = sum_a / size, sum_b / size
    cross = total(a * b) - mean_b * sum_a - mean_a * sum_b + mean_a * mean_b * size
    var_a = total(a * a) - 2 * mean_a * sum_a + mean_a * mean_a * size
    var_b = total(b * b) - 2 * mean_b * sum_b + mean_b * mean_b * size
    return -(cross * cross / (var_a * var_b + 1e-5)).mean()


def test_similarity_is_the_squared_box_lncc(generator):
    a = torch.rand(2, 1, 12, 14, 16, generator=generator, dtype=torch.float64)
    b = 0.5 * a + 0.5 * torch.rand(2, 1, 12, 14, 16, generator=generator, dtype=torch.float64)
    terms = SACBNetObjective()(
        FixedField(torch.zeros(2, 3, 12, 14, 16, dtype=torch.float64)), {"moving": a, "fixed": b}
    )
    torch.testing.assert_close(terms.similarity.detach(), box_lncc_loss(a, b))
    torch.testing.assert_close(terms.similarity.detach(), 1 + reference_code_ncc(a, b), atol=1e-3, rtol=0)
    same = SACBNetObjective()(FixedField(torch.zeros(2, 3, 12, 14, 16, dtype=torch.float64)), {"moving": a, "fixed": a})
    assert 0.0 <= float(same.similarity.detach()) < 1e-3  # the minimum, up to the variance epsilon
    assert float(same.diffusion.detach()) == 0.0
    assert float(same.total.detach()) == float(same.similarity.detach())


def test_diffusion_of_a_linear_field():
    matrix = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.04, 0.2]], dtype=torch.float64)
    grid = spatial.identity_grid((8, 9, 10), dtype=torch.float64)
    ddf = torch.einsum("cd,dxyz->cxyz", matrix, grid)[None].repeat(2, 1, 1, 1, 1)
    value = diffusion_regularisation(ddf)
    torch.testing.assert_close(value, (matrix**2).sum() / 9)
    torch.testing.assert_close(DiffusionLoss()(ddf), 3 * value)  # MONAI's normalisation (see the docstring)


def test_diffusion_penalises_a_field_alternating_voxel_by_voxel():
    index = spatial.identity_grid((6, 6, 6)).sum(0)
    ddf = (0.5 * (-1.0) ** index).expand(1, 3, 6, 6, 6)
    torch.testing.assert_close(diffusion_regularisation(ddf), torch.tensor(1.0))
    assert float(DiffusionLoss()(ddf)) == 0.0  # central differences cannot see it


def blocks(shape: tuple[int, ...], boxes: dict[int, tuple[slice, ...]]) -> torch.Tensor:
    label = torch.zeros(1, 1, *shape, dtype=torch.int64)
    for value, box in boxes.items():
        label[(0, 0, *box)] = value
    return label


def test_dice_term_of_identical_labels_is_zero_and_of_disjoint_labels_one():
    shape = (10, 10, 10)
    label = blocks(shape, {1: (slice(2, 6), slice(2, 8), slice(1, 5)), 3: (slice(6, 9), slice(1, 9), slice(5, 9))})
    zero = torch.zeros(1, 3, *shape)
    torch.testing.assert_close(soft_dice_loss(label, label, zero), torch.tensor(0.0), atol=1e-6, rtol=0)
    other = blocks(shape, {2: (slice(2, 6), slice(2, 8), slice(1, 5))})
    torch.testing.assert_close(soft_dice_loss(label, other, zero), torch.tensor(1.0))
    assert float(soft_dice_loss(torch.zeros_like(label), torch.zeros_like(label), zero)) == 0.0


def test_dice_term_follows_the_warp_convention_and_has_gradients():
    shape = (10, 10, 10)
    moving = blocks(shape, {1: (slice(3, 7), slice(2, 8), slice(2, 8))})
    fixed = blocks(shape, {1: (slice(4, 8), slice(2, 8), slice(2, 8))})
    shift = torch.zeros(1, 3, *shape)
    shift[:, 0] = -1.0  # warped(x) = moving(x - e_0): the block moves by +1 along axis 0
    torch.testing.assert_close(soft_dice_loss(moving, fixed, shift), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(soft_dice_loss(moving, fixed, torch.zeros_like(shift)), torch.tensor(0.25))
    half = (0.5 * shift).requires_grad_()
    soft_dice_loss(moving, fixed, half).backward()
    assert half.grad is not None and float(half.grad[:, 0].sum()) > 0  # moving further along -e_0 helps
    only_one = soft_dice_loss(moving, fixed, torch.zeros_like(shift), labels=(1, 99))  # 99: absent, skipped
    torch.testing.assert_close(only_one, torch.tensor(0.25))


def test_objective_uses_labels_only_when_present_and_weighted():
    generator = torch.Generator().manual_seed(1)
    shape = (10, 10, 10)
    images = {"moving": torch.rand(1, 1, *shape, generator=generator), "fixed": torch.rand(1, 1, *shape)}
    labels = {
        "moving_label": blocks(shape, {1: (slice(3, 7), slice(2, 8), slice(2, 8))}),
        "fixed_label": blocks(shape, {1: (slice(4, 8), slice(2, 8), slice(2, 8))}),
    }
    network = FixedField(0.3 * torch.randn(1, 3, *shape, generator=generator))
    objective = SACBNetObjective(lam=2.0, dice_weight=0.5)
    unlabelled = objective(network, images)
    assert set(unlabelled.parts) == {"similarity", "diffusion"}
    torch.testing.assert_close(unlabelled.total, unlabelled.similarity + 2.0 * unlabelled.diffusion)
    labelled = objective(network, {**images, **labels})
    assert set(labelled.parts) == {"similarity", "diffusion", "dice"}
    expected = soft_dice_loss(labels["moving_label"], labels["fixed_label"], network.ddf)
    torch.testing.assert_close(labelled.dice, expected)
    torch.testing.assert_close(labelled.total, unlabelled.total + 0.5 * expected)
    assert "dice" not in SACBNetObjective(lam=2.0)(network, {**images, **labels}).parts


def test_objective_arguments_are_checked():
    assert SACBNET_LAMBDAS == {"ixi": 3.0, "lpba": 1.0, "abdomen_ct": 0.3}
    for arguments, name in (({"lam": -1.0}, "lam"), ({"dice_weight": -0.1}, "dice_weight"), ({"window": 8}, "window")):
        with pytest.raises(ValueError, match=name):
            SACBNetObjective(**arguments)
    with pytest.raises(ValueError, match="ddf"):
        diffusion_regularisation(torch.zeros(1, 2, 4, 4, 4))
