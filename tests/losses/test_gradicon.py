"""GradICONLoss: exact inverse pairs, an analytic value for linear maps, monotonicity and argument checks."""

from __future__ import annotations

import pytest
import torch

from monai_unireg.losses import GradICONLoss
from monai_unireg.spatial import identity_grid


def linear_field(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel field ``[1, n, *shape]`` of the map ``x_n -> matrix (x_n - 0.5) + 0.5`` in normalised [0, 1] units."""
    n = len(shape)
    grid = identity_grid(shape, dtype=torch.float64)
    extent = torch.tensor([s - 1 for s in shape], dtype=torch.float64).view(n, *([1] * n))
    centred = grid / extent - 0.5
    mapped = torch.einsum("ij,j...->i...", matrix, centred) + 0.5
    return ((mapped - grid / extent) * extent).unsqueeze(0)


# Contractions about the centre keep every sample point of the inner map inside the grid, so that linear
# interpolation (exact for linear fields) is never replaced by border padding.
EXPAND = torch.tensor([[1.2, 0.05, 0.0], [0.0, 1.15, 0.05], [0.03, 0.0, 1.1]], dtype=torch.float64)
CONTRACT_A = torch.tensor([[0.8, 0.05, 0.0], [0.02, 0.9, 0.0], [0.0, -0.03, 0.85]], dtype=torch.float64)
CONTRACT_B = torch.tensor([[0.9, 0.0, 0.04], [0.0, 0.75, 0.0], [0.05, 0.0, 0.95]], dtype=torch.float64)


@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 18, 14)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_for_exact_inverse_linear_pair(shape, dtype):
    ddf_ab = linear_field(EXPAND, shape).to(dtype)
    ddf_ba = linear_field(torch.linalg.inv(EXPAND), shape).to(dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-12
    assert GradICONLoss(jitter=False)(ddf_ab, ddf_ba).item() == pytest.approx(0.0, abs=tolerance)


def test_zero_for_translation_pair_with_jitter():
    shift = torch.tensor([1.5, -2.0, 0.7]).view(1, 3, 1, 1, 1).expand(2, 3, 15, 12, 13).contiguous()
    assert GradICONLoss(seed=3)(shift, -shift).item() == pytest.approx(0.0, abs=1e-6)
    zero = torch.zeros(1, 3, 8, 8, 8)
    assert GradICONLoss()(zero, zero).item() == 0.0


@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 18, 14)])
def test_analytic_value_for_linear_pair(shape):
    """``e(x) = (I - AB)(x - 0.5)`` in normalised units, so the loss is ``||I - AB||_F^2 / n`` on any grid."""
    ddf_ab = linear_field(CONTRACT_A, shape)
    ddf_ba = linear_field(CONTRACT_B, shape)
    expected = torch.linalg.matrix_norm(torch.eye(3, dtype=torch.float64) - CONTRACT_A @ CONTRACT_B) ** 2 / 3
    for delta in (0.001, 0.01):
        got = GradICONLoss(jitter=False, delta=delta)(ddf_ab, ddf_ba)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_analytic_value_two_dimensional():
    """Also checks ``subsample``: with step 3 the last sample point stays one ``delta`` inside the grid."""
    a = torch.tensor([[0.8, 0.1], [0.0, 0.9]], dtype=torch.float64)
    b = torch.tensor([[0.85, 0.0], [-0.05, 0.7]], dtype=torch.float64)
    got = GradICONLoss(jitter=False, subsample=3)(linear_field(a, (20, 17)), linear_field(b, (20, 17)))
    expected = torch.linalg.matrix_norm(torch.eye(2, dtype=torch.float64) - a @ b) ** 2 / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_grows_with_inconsistency(generator):
    shape = (16, 16, 16)
    ddf_ab = linear_field(EXPAND, shape).float()
    ddf_ba = linear_field(torch.linalg.inv(EXPAND), shape).float()
    noise = torch.randn(1, 3, *shape, generator=generator)
    perturbation = 2.0 * torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
    values = [GradICONLoss(jitter=False)(ddf_ab, ddf_ba + s * perturbation).item() for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values[0] < 1e-4
    assert all(later > 2.0 * earlier for earlier, later in zip(values, values[1:]))


def test_seed_makes_jitter_reproducible(generator):
    ddf_ab = torch.randn(1, 3, 10, 10, 10, generator=generator)
    ddf_ba = torch.randn(1, 3, 10, 10, 10, generator=generator)
    first, second = GradICONLoss(seed=7), GradICONLoss(seed=7)
    values = [first(ddf_ab, ddf_ba), first(ddf_ab, ddf_ba)]
    assert torch.equal(values[0], second(ddf_ab, ddf_ba))
    assert not torch.equal(values[0], values[1])


def test_reductions_batch_and_gradient(generator):
    ddf_ab = (0.5 * torch.randn(2, 3, 10, 9, 8, generator=generator)).requires_grad_()
    ddf_ba = (0.5 * torch.randn(2, 3, 10, 9, 8, generator=generator)).requires_grad_()
    per_sample = GradICONLoss(jitter=False, reduction="none")(ddf_ab, ddf_ba)
    assert per_sample.shape == (2,) and (per_sample > 0).all()
    single = GradICONLoss(jitter=False)(ddf_ab[1:], ddf_ba[1:])
    assert torch.allclose(per_sample[1], single)
    assert torch.allclose(GradICONLoss(jitter=False, reduction="sum")(ddf_ab, ddf_ba), per_sample.sum())
    GradICONLoss(seed=0)(ddf_ab, ddf_ba).backward()
    for field in (ddf_ab, ddf_ba):
        assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


def test_float16_fields_give_float32():
    shift = torch.full((1, 3, 8, 8, 8), 0.5, dtype=torch.float16)
    value = GradICONLoss(seed=0)(shift, -shift)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    good = torch.zeros(1, 3, 8, 8, 8)
    loss = GradICONLoss()
    with pytest.raises(ValueError, match="ddf_ab"):
        loss(torch.zeros(1, 3, 8, 8, 8, 8), good)
    with pytest.raises(ValueError, match="ddf_ab"):
        loss(torch.zeros(1, 2, 8, 8, 8), good)
    with pytest.raises(ValueError, match="ddf_ba"):
        loss(good, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="ddf_ab and ddf_ba"):
        loss(good, torch.zeros(1, 3, 8, 8, 9))
    with pytest.raises(ValueError, match="ddf_ba"):
        loss(good, good.clone().index_fill_(2, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match="ddf_ab"):
        loss(good.clone().index_fill_(2, torch.tensor([3]), float("inf")), good)
    with pytest.raises(ValueError, match="ddf_ab"):
        loss(torch.zeros(1, 3, 1, 8, 8), torch.zeros(1, 3, 1, 8, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "foo"}, "reduction"),
        ({"delta": 0.0}, "delta"),
        ({"subsample": 0}, "subsample"),
        ({"jitter": "yes"}, "jitter"),
        ({"jitter_scale": 0.0}, "jitter_scale"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradICONLoss(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(generator):
    ddf_ab = torch.randn(2, 3, 10, 9, 8, generator=generator)
    ddf_ba = torch.randn(2, 3, 10, 9, 8, generator=generator)
    expected = GradICONLoss(seed=5)(ddf_ab, ddf_ba)
    got = GradICONLoss(seed=5)(ddf_ab.cuda(), ddf_ba.cuda())
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), expected, rtol=1e-4)


def _smooth_field(shape: tuple[int, ...], magnitude: float, generator: torch.Generator) -> torch.Tensor:
    """A smooth random ``[1, 3, *shape]`` voxel field: random values on a 4^3 grid, upsampled trilinearly."""
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator, dtype=torch.float64) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def _reference_map(steps: list[torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """``phi_1(phi_2(...phi_k(x)))`` at normalised [0, 1] points ``[B, 3, *P]``, written as icon_registration does:
    each step a function ``x + u(x)`` with ``u`` in normalised units, sampled by ``grid_sample`` (border)."""
    for step in reversed(steps):
        extent = torch.tensor([s - 1 for s in step.shape[2:]], dtype=torch.float64).view(1, 3, 1, 1, 1)
        grid = (2 * points - 1).flip(1).permute(0, 2, 3, 4, 1)
        sampled = torch.nn.functional.grid_sample(
            step / extent, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        points = points + sampled
    return points


def _reference_gradicon(steps_ab, steps_ba, shape, noise, delta=0.001, subsample=2) -> torch.Tensor:
    """The reference GradICON term in float64 at the jittered points ``grid / (N - 1) + 2 noise / N``."""
    extent = torch.tensor([s - 1 for s in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    size = torch.tensor(list(shape), dtype=torch.float64).view(1, 3, 1, 1, 1)
    grid = identity_grid(shape, dtype=torch.float64)[:, ::subsample, ::subsample, ::subsample].unsqueeze(0)
    points = grid / extent + 2 * noise.to(torch.float64) / size
    error = points - _reference_map(steps_ab, _reference_map(steps_ba, points))
    total = torch.zeros((), dtype=torch.float64)
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, dtype=torch.float64)
        step[:, axis] = delta
        moved = points + step - _reference_map(steps_ab, _reference_map(steps_ba, points + step))
        total = total + (((error - moved) / delta) ** 2).mean()
    return total


def test_cascade_of_steps_matches_float64_function_composition(generator):
    # uniGradICON's step grids for a 32^3 working size: 1/4, 1/2, full, full.
    shapes = [(8, 8, 8), (16, 16, 16), (32, 32, 32), (32, 32, 32)]
    steps_ab = [_smooth_field(s, 0.6 * s[0] / 32 * 3, generator) for s in shapes]
    steps_ba = [_smooth_field(s, 0.6 * s[0] / 32 * 3, generator) for s in shapes]
    loss = GradICONLoss(seed=7)(steps_ab, steps_ba)
    noise = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = _reference_gradicon(steps_ab, steps_ba, (32, 32, 32), noise)
    assert abs(float(loss) - float(reference)) <= 1e-4 * float(reference)


def test_cascade_differs_from_the_field_collapsed_onto_the_grid(generator):
    from monai_unireg.networks.nets import UniGradICON

    shapes = [(8, 8, 8), (16, 16, 16), (32, 32, 32)]
    steps_ab = [_smooth_field(s, 0.6 * s[0] / 32 * 3, generator).float() for s in shapes]
    steps_ba = [_smooth_field(s, 0.6 * s[0] / 32 * 3, generator).float() for s in shapes]
    composed = GradICONLoss(seed=3)(steps_ab, steps_ba)
    collapsed = GradICONLoss(seed=3)(UniGradICON.chain(steps_ab, (32,) * 3), UniGradICON.chain(steps_ba, (32,) * 3))
    assert abs(float(composed) - float(collapsed)) > 0.01 * float(composed)
    one_step = GradICONLoss(seed=3)([steps_ab[-1]], [steps_ba[-1]])
    assert torch.equal(one_step, GradICONLoss(seed=3)(steps_ab[-1], steps_ba[-1]))
