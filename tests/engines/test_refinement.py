"""The continuous refinement stage (ours, beyond the VoxelOpt paper) and VoxelOpt + refinement."""

from __future__ import annotations

import phantoms
import pytest
import torch

from monai_unireg import spatial
from monai_unireg.engines.instance_optimisation import adam_on_field
from monai_unireg.engines.refinement import (
    CLI_REFINEMENT,
    CLI_VOXELOPT_FACTOR,
    Downsampled,
    FieldRefinement,
    RefinedRegistration,
    _local_normalisation,
    _similarity_gradient,
    level_shapes,
    refine_field,
    refined_voxelopt,
)
from monai_unireg.losses import LNCCLoss
from monai_unireg.losses.lncc import window_kernel
from monai_unireg.networks.nets import VoxelOpt

SIZE = 40
FAST = {"factors": (2, 1), "iterations": (30, 15), "learning_rate": 0.2, "gradient_sigma": 1.0}


def quantised_object(size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return phantoms.quantised_object(size, seed, texture_cells=10)


def known_pair(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moving, fixed, true_field, inside``: the object under a smooth field that vanishes outside it."""
    fixed, inside = quantised_object(size)
    generator = torch.Generator().manual_seed(3)
    axis = torch.linspace(-1, 1, size)
    radius = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).norm(dim=0)
    coarse = torch.nn.functional.interpolate(
        torch.randn(1, 3, 4, 4, 4, generator=generator), size=fixed.shape[2:], mode="trilinear", align_corners=True
    )
    velocity = coarse / coarse.abs().max() * 6.0 * (0.55 - radius).clamp(0, 0.4) / 0.4
    true_field = spatial.integrate_velocity(velocity)
    moving = torch.round(spatial.warp(fixed, spatial.integrate_velocity(-velocity)) * 255) / 255
    return moving, fixed, true_field, inside


@pytest.fixture(scope="module")
def known() -> dict[str, torch.Tensor]:
    moving, fixed, true_field, inside = known_pair()
    start = VoxelOpt(num_levels=3, mind_radius=1, mind_dilation=1)(moving, fixed)
    return {"moving": moving, "fixed": fixed, "true": true_field, "inside": inside, "start": start}


def endpoint_error(ddf: torch.Tensor, true_field: torch.Tensor, mask: torch.Tensor) -> float:
    return float((ddf - true_field).norm(dim=1)[0][mask].mean())


@pytest.mark.parametrize("settings", [FAST, CLI_REFINEMENT], ids=["fast", "command-line"])
@pytest.mark.parametrize("similarity", ["nsd", "mind"])
def test_identity_pair_stays_still(similarity, settings):
    """An 8-bit object in a flat background against itself: the zero field stays zero to 0.05 voxel everywhere
    (issue 13's criterion), with the test's short settings and the command line's. With ``gradient_floor`` 0.01
    the command line's settings moved up to 0.30 voxel under ``"nsd"`` (18 % of the voxels by more than 0.1): see
    ``CLI_REFINEMENT``. (LNCC is left out on purpose: its ``eps`` makes it non-stationary at ``warped = fixed``, see
    ``refine_field``.)"""
    image, _ = quantised_object()
    ddf = refine_field(image, image, torch.zeros(1, 3, *image.shape[2:]), **{**settings, "similarity": similarity})
    assert ddf.shape == (1, 3, SIZE, SIZE, SIZE)
    assert float(ddf.norm(dim=1).max()) < 0.05


def test_written_out_similarity_gradients_are_autograd():
    """The gradients each similarity hands to the Adam loop, against autograd of its objective (float64; the
    variance of the normalised difference is exactly 0 over the flat block, where relu's derivative is 0)."""
    generator = torch.Generator().manual_seed(5)
    warped = torch.rand(2, 1, 9, 10, 11, generator=generator, dtype=torch.float64)
    warped[:, :, :4] = 0.3
    window = window_kernel("gaussian", sigma=2.0).double()
    fixed_normalised = _local_normalisation(torch.rand(2, 1, 9, 10, 11, generator=generator, dtype=torch.float64),
                                            window, 1e-3)  # fmt: skip
    features = torch.rand(2, 12, 9, 10, 11, generator=generator, dtype=torch.float64)
    objectives = {
        "nsd": (lambda w: (_local_normalisation(w, window, 1e-3) - fixed_normalised).square().mean(), warped,
                fixed_normalised),
        "mind": (lambda w: (w - features).square().mean(), features.flip(2), features),
        "lncc": (lambda w: LNCCLoss(sigma=2.0, eps=1e-3)(w, warped.flip(3)), warped, warped.flip(3)),
    }  # fmt: skip
    for similarity, (objective, value, fixed_level) in objectives.items():
        variable = value.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(objective(variable), variable)
        gradient = _similarity_gradient(similarity, 2.0, 1e-3)(value.clone(), fixed_level)
        torch.testing.assert_close(gradient, expected, atol=1e-15, rtol=1e-10, msg=similarity)


@pytest.mark.parametrize("similarity", ["nsd", "mind"])
def test_known_field_is_recovered_better_than_the_voxelopt_start(known, similarity):
    before = endpoint_error(known["start"], known["true"], known["inside"])
    ddf = refine_field(known["moving"], known["fixed"], known["start"], similarity=similarity, **FAST)
    after = endpoint_error(ddf, known["true"], known["inside"])
    assert after < 0.9 * before, (before, after)


def test_flat_background_stays_still(known):
    ddf = refine_field(known["moving"], known["fixed"], known["start"], **FAST)
    axis = torch.linspace(-1, 1, SIZE)
    radius = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).norm(dim=0)
    far = radius > 0.75  # the flat background, two voxels or more from the object
    assert float(ddf.norm(dim=1)[0][far].max()) < 0.5


def test_bit_identical_across_runs(known):
    settings = FAST
    first = refine_field(known["moving"], known["fixed"], known["start"], **settings)
    second = refine_field(known["moving"], known["fixed"], known["start"], **settings)
    assert torch.equal(first, second) and not torch.equal(first, known["start"])


def test_levels_adapt_to_the_volume():
    assert level_shapes((80, 96, 112), (4, 2, 1)) == [(20, 24, 28), (40, 48, 56), (80, 96, 112)]
    # a level over max_voxels is coarsened; levels on the same grid merge
    assert level_shapes((80, 96, 112), (2, 1), max_voxels=300_000) == [(40, 48, 56)]
    assert level_shapes((16, 16, 16), (4, 2, 1)) == [(8, 8, 8), (16, 16, 16)]


def test_zero_iterations_and_batches(known):
    start = known["start"]
    assert torch.equal(refine_field(known["moving"], known["fixed"], start, iterations=0), start)
    pair = [torch.cat([x, x.flip(2)]) for x in (known["moving"], known["fixed"], start)]
    both = refine_field(*pair, **FAST)
    one = refine_field(pair[0][1:], pair[1][1:], pair[2][1:], **FAST)
    assert both.shape == (2, 3, SIZE, SIZE, SIZE)
    torch.testing.assert_close(both[1:], one, atol=0.05, rtol=0)


def test_refined_registration_and_progress(known):
    calls = []
    network = RefinedRegistration(VoxelOpt(num_levels=3), FieldRefinement(**FAST))
    network.progress = lambda done, total: calls.append((done, total))
    ddf = network(known["moving"], known["fixed"])
    assert ddf.shape == (1, 3, SIZE, SIZE, SIZE)
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert network.initial.progress is None and network.refinement.progress is None
    cli = refined_voxelopt((SIZE,) * 3)
    assert isinstance(cli.initial, Downsampled) and cli.initial.factor == CLI_VOXELOPT_FACTOR == 2
    assert isinstance(cli.initial.network, VoxelOpt) and cli.refinement.settings == CLI_REFINEMENT
    assert cli.initial.network.num_levels == VoxelOpt.levels_for((SIZE // 2,) * 3)
    assert isinstance(refined_voxelopt((SIZE,) * 3, voxelopt_factor=1).initial, VoxelOpt)


def test_downsampled_network_runs_on_the_small_grid_and_reports_its_progress(known):
    """Downsampled: the network sees the pair shrunk by the factor, its field comes back on the input grid (a
    constant field of 1 small voxel is 2 input voxels, up to the corner-aligned grids' ratio), progress passes
    through."""
    seen, calls = [], []

    class Shift(torch.nn.Module):
        progress = None

        def forward(self, moving, fixed):
            seen.append(tuple(fixed.shape[2:]))
            self.progress(1, 1)
            return torch.ones(1, 3, *fixed.shape[2:])

    network = Downsampled(Shift(), 2)
    network.progress = lambda done, total: calls.append((done, total))
    ddf = network(known["moving"], known["fixed"])
    assert seen == [(SIZE // 2,) * 3] and calls == [(1, 1)] and ddf.shape == (1, 3, SIZE, SIZE, SIZE)
    torch.testing.assert_close(ddf, torch.full_like(ddf, (SIZE - 1) / (SIZE // 2 - 1)))


def test_adam_on_field_minimises_a_quadratic():
    target = torch.arange(6.0).view(1, 3, 2, 1, 1)

    def objective(field: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (field - target).square().mean(), {}

    field, losses = adam_on_field(torch.zeros_like(target), objective, 200, 0.1)
    assert len(losses) == 201 and losses[-1] < 1e-3 * losses[0]
    torch.testing.assert_close(field, target, atol=0.05, rtol=0)


def test_adam_on_field_after_step_may_change_the_field():
    """``after_step`` runs after every step, without gradients: here it clamps the field, which then ends at the
    clamp instead of the target."""
    target = torch.full((1, 3, 2, 1, 1), 4.0)
    calls = []

    def clamp(field: torch.Tensor) -> None:
        calls.append(torch.is_grad_enabled())
        field.clamp_(max=1.0)

    field, _ = adam_on_field(
        torch.zeros_like(target), lambda f: ((f - target).square().mean(), {}), 50, 0.2, after_step=clamp
    )
    assert calls == [False] * 50
    torch.testing.assert_close(field, torch.ones_like(target))


def test_field_smoothing_keeps_a_smooth_field_and_removes_voxel_noise(known):
    """With ``field_sigma`` (smoothing of the field after each step, as Greedy smooths its warp) and no diffusion
    term, the known field is still recovered better than the start, and the result has less voxel-scale roughness
    (mean squared second difference) than without the smoothing."""
    settings = {**FAST, "smoothness": 0.0}
    rough = refine_field(known["moving"], known["fixed"], known["start"], **settings)
    smooth = refine_field(known["moving"], known["fixed"], known["start"], field_sigma=0.5, **settings)
    before = endpoint_error(known["start"], known["true"], known["inside"])
    assert endpoint_error(smooth, known["true"], known["inside"]) < 0.9 * before

    def roughness(ddf: torch.Tensor) -> float:
        return float((ddf[:, :, 2:] - 2 * ddf[:, :, 1:-1] + ddf[:, :, :-2]).square().mean())

    assert roughness(smooth) < roughness(rough)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"similarity": "ssd"}, "similarity"),
        ({"factors": (1, 2)}, "factors"),
        ({"factors": ()}, "factors"),
        ({"factors": (2, 0)}, "factors"),
        ({"iterations": (10, 10, 10, 10)}, "iterations"),
        ({"iterations": -1}, "iterations"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"smoothness": -1.0}, "smoothness"),
        ({"max_voxels": 0}, "max_voxels"),
        ({"gradient_sigma": -1.0}, "gradient_sigma"),
        ({"gradient_floor": 0.0}, "gradient_floor"),
        ({"field_sigma": -0.5}, "field_sigma"),
        ({"lncc_sigma": 0.0}, "lncc_sigma"),
        ({"mind_radius": -1}, "mind_radius"),
    ],
)
def test_bad_settings(settings, match):
    image = torch.rand(1, 1, 12, 12, 12)
    with pytest.raises(ValueError, match=match):
        refine_field(image, image, torch.zeros(1, 3, 12, 12, 12), **settings)
    with pytest.raises(ValueError, match=match):
        FieldRefinement(**settings)


def test_bad_tensors_and_unknown_settings():
    image = torch.rand(1, 1, 12, 12, 12)
    with pytest.raises(ValueError, match="initial_ddf"):
        refine_field(image, image, torch.zeros(1, 3, 12, 12, 10))
    with pytest.raises(ValueError, match="initial_ddf"):
        refine_field(image, image, torch.zeros(2, 3, 12, 12, 12))
    with pytest.raises(ValueError, match="moving"):
        refine_field(image[0], image, torch.zeros(1, 3, 12, 12, 12))
    with pytest.raises(ValueError, match="unknown refinement settings"):
        FieldRefinement(levels=(2, 1))
    with pytest.raises(ValueError, match="initial"):
        RefinedRegistration(lambda m, f: m, FieldRefinement())
