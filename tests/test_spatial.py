"""Spatial core: analytic checks of warping, composition order, integration, resizing and units."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.networks.blocks import Warp

from monai_unireg import spatial

SHAPE = (12, 14, 16)


def linear_field(matrix: np.ndarray, shape=SHAPE, centre=None, dtype=torch.float64) -> torch.Tensor:
    """``[1, 3, *shape]`` voxel field of the affine map ``x -> M (x - c) + c``, i.e. ``u(x) = (M - I)(x - c)``."""
    centre = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape])
    grid = spatial.identity_grid(shape, dtype=torch.float64) - torch.tensor(centre).view(3, 1, 1, 1)
    u = torch.einsum("ij,j...->i...", torch.tensor(matrix - np.eye(3)), grid)
    return u.unsqueeze(0).to(dtype)


def smooth_field(generator: torch.Generator, shape=SHAPE, amplitude: float = 1.5) -> torch.Tensor:
    """A smooth random ``[1, 3, *shape]`` field: coarse noise upsampled."""
    coarse = torch.randn(1, 3, 3, 3, 3, generator=generator, dtype=torch.float64) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def interior(x: torch.Tensor, margin: int = 3) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin, margin:-margin]


def test_identity_grid_holds_voxel_indices():
    grid = spatial.identity_grid((2, 3, 4))
    assert grid.shape == (3, 2, 3, 4)
    assert grid[0, 1, 2, 3] == 1 and grid[1, 1, 2, 3] == 2 and grid[2, 1, 2, 3] == 3


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_warp_matches_monai_warp(generator, mode, padding_mode):
    image = torch.rand(2, 2, *SHAPE, generator=generator)
    ddf = torch.randn(2, 3, *SHAPE, generator=generator) * 2
    expected = Warp(mode=mode, padding_mode=padding_mode)(image, ddf)
    torch.testing.assert_close(spatial.warp(image, ddf, mode, padding_mode), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "batch, channels, shape",
    [(1, 1, (9, 10, 11)), (1, 1, (12, 7, 6)), (2, 3, (7, 8, 9)), (1, 2, (13, 6, 5)), (1, 1, (1, 4, 5))],
)
def test_pullback_sampler_is_autograd_through_warp(generator, threads, batch, channels, shape):
    """The hand-called sampler backward pass (slab layout of one pair or a batch, odd row counts) against autograd
    through ``warp``, in float64."""
    image = torch.rand(batch, channels, *shape, generator=generator, dtype=torch.float64)
    ddf = torch.randn(batch, 3, *shape, generator=generator, dtype=torch.float64) * 2
    upstream = torch.randn(batch, channels, *shape, generator=generator, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        variable = ddf.clone().requires_grad_(True)
        expected_warped = spatial.warp(image, variable)
        (expected,) = torch.autograd.grad((expected_warped * upstream).sum(), variable)
        warped, pullback = spatial.pullback_sampler(image)(ddf)
        gradient = pullback(upstream)
    finally:
        torch.set_num_threads(previous)
    assert not warped.requires_grad and not gradient.requires_grad
    torch.testing.assert_close(warped, expected_warped.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(gradient, expected, atol=1e-12, rtol=0)


def test_pullback_sampler_float32_on_a_tall_tiled_source(generator):
    """float32 against float64 where the tiled source has many rows (61 x 152, rounding about 5e-4 row): the
    warp within 1e-3, the gradient the same almost everywhere (it jumps at cell edges) and exactly 0 along an
    axis where the point is clamped to the border (even where rounding would cross a tile's edge)."""
    shape = (60, 150, 6)
    image = torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64)
    ddf = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float64) * 3
    upstream = torch.randn(1, 1, *shape, generator=generator, dtype=torch.float64)
    reference_warped, reference_pullback = spatial.pullback_sampler(image)(ddf)
    reference = reference_pullback(upstream)
    warped, pullback = spatial.pullback_sampler(image.float())(ddf.float())
    gradient = pullback(upstream.float())
    assert warped.dtype == gradient.dtype == torch.float32
    assert (warped.double() - reference_warped).abs().max() < 1e-3
    close = ((gradient.double() - reference).abs() < 1e-3).float().mean()
    assert close > 0.999
    coordinates = spatial.identity_grid(shape, dtype=torch.float64).unsqueeze(0) + ddf
    for axis, size in ((0, shape[0]), (1, shape[1])):
        clamped = (coordinates[:, axis] < 0) | (coordinates[:, axis] > size - 1)
        assert clamped.any() and (gradient[:, axis][clamped] == 0).all()


def test_warp_integer_shift_reads_moving_at_x_plus_u(generator):
    image = torch.rand(1, 1, *SHAPE, generator=generator)
    ddf = torch.zeros(1, 3, *SHAPE)
    ddf[:, 1] = 2.0
    warped = spatial.warp(image, ddf)
    torch.testing.assert_close(warped[:, :, :, :-2], image[:, :, :, 2:])


def test_warp_float16_matches_float32(generator):
    image = torch.rand(1, 1, 40, 40, 40, generator=generator)
    ddf = torch.randn(1, 3, 40, 40, 40, generator=generator)
    reference = spatial.warp(image, ddf)
    half = spatial.warp(image.half(), ddf.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference, atol=5e-3, rtol=0)


def test_compose_shift_with_its_inverse_is_zero():
    shift = torch.zeros(1, 3, *SHAPE)
    shift[:, 0], shift[:, 1], shift[:, 2] = 1.5, -2.25, 0.75
    assert spatial.compose(shift, -shift).abs().max() < 1e-6
    assert spatial.compose(-shift, shift).abs().max() < 1e-6


def test_compose_affine_with_its_inverse_is_zero_inside():
    matrix = np.array([[1.1, 0.05, 0.0], [0.0, 0.95, 0.1], [-0.05, 0.0, 1.05]])
    forward = linear_field(matrix)
    inverse = linear_field(np.linalg.inv(matrix))
    assert interior(spatial.compose(forward, inverse)).abs().max() < 1e-9
    assert interior(spatial.compose(inverse, forward)).abs().max() < 1e-9


def test_compose_order_is_outer_after_inner():
    """compose(outer, inner)(x) = inner(x) + outer(x + inner(x)): checked against the two analytic orders."""
    translation = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    translation[:, 0] = 1.0
    matrix = np.diag([1.2, 1.0, 1.0])
    scaling = linear_field(matrix)
    composed = spatial.compose(outer=translation, inner=scaling)
    # phi_outer(phi_inner(x)) = M (x - c) + c + t  ->  field (M - I)(x - c) + t
    torch.testing.assert_close(interior(composed), interior(scaling + translation))
    # the other order would give (M - I)(x - c) + M t: different along axis 0
    reverse = spatial.compose(outer=scaling, inner=translation)
    torch.testing.assert_close(interior(reverse[:, 0]), interior(scaling[:, 0] + 1.2))


def test_warp_twice_equals_warp_by_composition(generator):
    """On a linear image trilinear interpolation is exact, so both sides must agree to rounding."""
    slope = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    image = torch.einsum("i,i...->...", slope, spatial.identity_grid(SHAPE, dtype=torch.float64))[None, None]
    outer, inner = smooth_field(generator), smooth_field(generator)
    twice = spatial.warp(spatial.warp(image, outer), inner)
    once = spatial.warp(image, spatial.compose(outer, inner))
    torch.testing.assert_close(interior(twice), interior(once))
    assert (interior(once) - interior(spatial.warp(image, spatial.compose(inner, outer)))).abs().max() > 1e-2


def test_integrate_constant_velocity_gives_the_shift():
    shape = (24, 24, 24)
    velocity = torch.zeros(1, 3, *shape)
    velocity[:, 0], velocity[:, 2] = 2.5, -1.25
    border = spatial.integrate_velocity(velocity, num_steps=7, padding_mode="border")
    torch.testing.assert_close(border, velocity, atol=1e-5, rtol=0)
    zeros = spatial.integrate_velocity(velocity, num_steps=7, padding_mode="zeros")
    torch.testing.assert_close(interior(zeros, 6), interior(velocity, 6), atol=1e-5, rtol=0)


def test_integrate_linear_velocity_matches_matrix_exponential():
    generator_matrix = np.array([[0.05, 0.02, 0.0], [-0.03, 0.0, 0.04], [0.01, -0.02, -0.04]])
    velocity = linear_field(np.eye(3) + generator_matrix)
    expected = linear_field(scipy.linalg.expm(generator_matrix))
    ddf = spatial.integrate_velocity(velocity, num_steps=10)
    assert (interior(ddf, 4) - interior(expected, 4)).abs().max() < 1e-4
    assert spatial.integrate_velocity(velocity, num_steps=0).equal(velocity)


def test_resize_keeps_physical_displacement():
    """A linear physical field sampled on two corner-aligned grids of one field of view agrees in mm."""
    old, new = (9, 11, 13), (17, 6, 25)
    spacing_old = np.array([2.0, 1.5, 1.0])
    spacing_new = spacing_old * (np.array(old) - 1) / (np.array(new) - 1)
    affine_old, affine_new = np.diag([*spacing_old, 1.0]), np.diag([*spacing_new, 1.0])
    affine_old[:3, 3] = affine_new[:3, 3] = [-10.0, 4.0, 7.0]
    physical_matrix = np.array([[0.1, 0.0, 0.05], [0.02, -0.1, 0.0], [0.0, 0.03, 0.08]])

    def field_mm(shape, affine):
        points = torch.einsum(
            "ij,j...->i...", torch.tensor(affine[:3, :3]), spatial.identity_grid(shape, dtype=torch.float64)
        )
        points = points + torch.tensor(affine[:3, 3]).view(3, 1, 1, 1)
        return torch.einsum("ij,j...->i...", torch.tensor(physical_matrix), points).unsqueeze(0) + 1.0

    ddf_old = spatial.ddf_mm_to_voxel(field_mm(old, affine_old), torch.tensor(affine_old))
    ddf_new = spatial.resize_ddf(ddf_old, new)
    torch.testing.assert_close(spatial.ddf_voxel_to_mm(ddf_new, torch.tensor(affine_new)), field_mm(new, affine_new))


def test_resize_scales_constant_field_values():
    ddf = torch.ones(1, 3, 9, 9, 9)
    resized = spatial.resize_ddf(ddf, (17, 5, 9))
    assert torch.allclose(resized[:, 0], torch.tensor(2.0)) and torch.allclose(resized[:, 1], torch.tensor(0.5))
    assert torch.allclose(resized[:, 2], torch.tensor(1.0))
    half_voxel = spatial.resize_ddf(ddf, (18, 9, 9), align_corners=False)
    assert torch.allclose(half_voxel[:, 0], torch.tensor(2.0))


def test_normalized_units_round_trip_and_grid_sample_agreement(generator):
    ddf = torch.randn(2, 3, *SHAPE, generator=generator)
    for value_range in ("[-1,1]", "[0,1]"):
        back = spatial.ddf_normalized_to_voxel(spatial.ddf_voxel_to_normalized(ddf, value_range), value_range)
        torch.testing.assert_close(back, ddf)
    full = torch.zeros(1, 3, *SHAPE)
    full[:, 2] = SHAPE[2] - 1
    assert torch.allclose(spatial.ddf_voxel_to_normalized(full, "[-1,1]")[:, 2], torch.tensor(2.0))
    assert torch.allclose(spatial.ddf_voxel_to_normalized(full, "[0,1]")[:, 2], torch.tensor(1.0))
    # warping with grid_sample on identity + normalised field (axes reversed) equals spatial.warp
    image = torch.rand(2, 1, *SHAPE, generator=generator)
    normalised = spatial.ddf_voxel_to_normalized(ddf, "[-1,1]")
    base = spatial.identity_grid(SHAPE).unsqueeze(0)
    base = spatial.ddf_voxel_to_normalized(base, "[-1,1]") - 1.0
    grid = (base + normalised).flip(1).movedim(1, -1)
    direct = torch.nn.functional.grid_sample(image, grid, padding_mode="border", align_corners=True)
    torch.testing.assert_close(spatial.warp(image, ddf), direct, atol=1e-5, rtol=0)


def test_voxel_mm_conversion_with_oblique_affine(generator):
    rotation = scipy.linalg.expm(np.array([[0, -0.3, 0.1], [0.3, 0, -0.2], [-0.1, 0.2, 0]]))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [5.0, -3.0, 12.0]
    ddf = torch.randn(2, 3, 4, 5, 6, generator=generator, dtype=torch.float64)
    ddf_mm = spatial.ddf_voxel_to_mm(ddf, torch.tensor(affine))
    # the mm vector is the difference of world positions of x + u and x
    voxel = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    u = ddf[0, :, 1, 2, 3]
    world = lambda v: torch.tensor(affine[:3, :3]) @ v + torch.tensor(affine[:3, 3])  # noqa: E731
    torch.testing.assert_close(ddf_mm[0, :, 1, 2, 3], world(voxel + u) - world(voxel))
    torch.testing.assert_close(spatial.ddf_mm_to_voxel(ddf_mm, torch.tensor(affine)), ddf)
    batched = torch.stack([torch.tensor(affine), torch.eye(4, dtype=torch.float64)])
    torch.testing.assert_close(spatial.ddf_voxel_to_mm(ddf, batched)[1], ddf[1])


def test_jacobian_determinant_identity_affine_and_reference(generator):
    assert torch.allclose(spatial.jacobian_determinant(torch.zeros(2, 3, *SHAPE)), torch.tensor(1.0))
    matrix = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.3]])
    det = spatial.jacobian_determinant(linear_field(matrix))
    assert det.shape == (1, 1, *SHAPE)
    torch.testing.assert_close(det, torch.full_like(det, np.linalg.det(matrix)))
    ddf = smooth_field(generator)
    grads = [np.gradient(ddf[0, i].numpy(), axis=(0, 1, 2)) for i in range(3)]
    jacobian = np.stack([np.stack(g, 0) for g in grads], 0) + np.eye(3).reshape(3, 3, 1, 1, 1)
    expected = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    np.testing.assert_allclose(spatial.jacobian_determinant(ddf)[0, 0].numpy(), expected, atol=1e-10)


def test_jacobian_determinant_negative_where_the_map_folds():
    ddf = linear_field(np.diag([-1.0, 1.0, 1.0]))
    assert (spatial.jacobian_determinant(ddf) < 0).all()


@pytest.mark.parametrize("method", ["onehot", "nearest"])
def test_warp_labels_keeps_label_values_and_dtype(generator, method):
    labels = torch.randint(0, 4, (2, 1, *SHAPE), generator=generator, dtype=torch.int16) * 7
    ddf = smooth_field(generator).float().repeat(2, 1, 1, 1, 1)
    warped = spatial.warp_labels(labels, ddf, method=method)
    assert warped.dtype == torch.int16 and warped.shape == labels.shape
    assert set(torch.unique(warped).tolist()) <= set(torch.unique(labels).tolist())


def onehot_reference(labels: torch.Tensor, ddf: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Definition of one-hot label warping: trilinear warp of every label's indicator, then argmax."""
    values = torch.unique(labels)
    indicators = torch.cat([(labels == v).double() for v in values], 1)
    scores = spatial.warp(indicators, ddf.double(), padding_mode=padding_mode)
    if padding_mode == "zeros":  # outside the grid counts as background
        outside = 1 - spatial.warp(torch.ones_like(labels, dtype=torch.float64), ddf.double(), padding_mode="zeros")
        scores[:, values.tolist().index(0)] += outside[:, 0]
    return values[scores.argmax(1, keepdim=True)]


@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
def test_warp_labels_onehot_equals_its_definition(generator, padding_mode):
    labels = torch.randint(0, 6, (2, 1, *SHAPE), generator=generator) * 3
    ddf = torch.cat([smooth_field(generator, amplitude=3.0) for _ in range(2)]).float()
    expected = onehot_reference(labels, ddf, padding_mode)
    warped = spatial.warp_labels(labels, ddf, padding_mode=padding_mode)
    assert (warped == expected).double().mean() > 0.999  # only exact ties may differ


def test_resize_image_nearest_is_corner_aligned():
    volume = torch.arange(17.0).view(1, 1, 17, 1, 1).expand(1, 1, 17, 2, 2)
    resized = spatial.resize_image(volume.to(torch.int16), (8, 2, 2), mode="nearest")
    expected = torch.round(torch.arange(8) * 16 / 7)
    assert resized.dtype == torch.int16 and resized[0, 0, :, 0, 0].tolist() == expected.tolist()


def test_warp_labels_integer_shift_is_exact(generator):
    labels = torch.randint(0, 5, (1, 1, *SHAPE), generator=generator)
    ddf = torch.zeros(1, 3, *SHAPE)
    ddf[:, 0] = -3.0
    for method in ("onehot", "nearest"):
        warped = spatial.warp_labels(labels, ddf, method=method)
        assert warped[:, :, 3:].equal(labels[:, :, :-3])


def test_warp_labels_onehot_follows_the_majority_at_half_voxel_shift():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, :, :, 4:] = 1
    ddf = torch.zeros(1, 3, 8, 8, 8)
    ddf[:, 2] = 0.4
    warped = spatial.warp_labels(labels, ddf)
    # sampling at index 3.4 sees 60 % of label 0 and 40 % of label 1
    assert (warped[..., 3] == 0).all() and (warped[..., 4] == 1).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: spatial.warp(torch.rand(1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8)), "image"),
        (lambda: spatial.warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 7)), "image and ddf"),
        (lambda: spatial.warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8)), "ddf"),
        (lambda: spatial.warp(torch.full((1, 1, 8, 8, 8), float("nan")), torch.zeros(1, 3, 8, 8, 8)), "image"),
        (lambda: spatial.warp(torch.rand(1, 1, 8, 8, 8), torch.full((1, 3, 8, 8, 8), float("inf"))), "ddf"),
        (lambda: spatial.warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), mode="cubic"), "mode"),
        (
            lambda: spatial.warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), padding_mode="wrap"),
            "padding_mode",
        ),
        (lambda: spatial.warp_labels(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8)), "labels"),
        (lambda: spatial.warp_labels(torch.ones(1, 2, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8)), "labels"),
        (lambda: spatial.warp_labels(torch.ones(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), method="linear"), "method"),
        (lambda: spatial.compose(torch.zeros(2, 3, 8, 8, 8), torch.zeros(1, 3, 8, 8, 9)), "outer and inner"),
        (lambda: spatial.integrate_velocity(torch.zeros(1, 3, 8, 8, 8), num_steps=-1), "num_steps"),
        (lambda: spatial.resize_ddf(torch.zeros(1, 3, 8, 8, 8), (8, 8)), "size"),
        (lambda: spatial.ddf_voxel_to_normalized(torch.zeros(1, 3, 8, 8, 8), "[0,2]"), "value_range"),
        (lambda: spatial.ddf_voxel_to_mm(torch.zeros(1, 3, 4, 4, 4), torch.zeros(4, 4)), "affine"),
        (lambda: spatial.ddf_voxel_to_mm(torch.zeros(1, 3, 4, 4, 4), torch.eye(3)), "affine"),
        (lambda: spatial.jacobian_determinant(torch.zeros(1, 3, 8, 8)), "ddf"),
        (lambda: spatial.identity_grid((4,)), "shape"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_resample_to_grid_undoes_a_reoriented_copy(generator):
    """The same physical image stored LPS instead of RAS, axes permuted: resampling brings it back exactly."""
    image = torch.rand(1, 1, 6, 7, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (1, 1, 6, 7, 8), generator=generator)
    affine = torch.tensor([[2.0, 0, 0, -5], [0, 1.5, 0, 3], [0, 0, 1.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    stored = image.flip(2, 3).permute(0, 1, 4, 2, 3)  # new axes: (z, -x, -y)
    labels_stored = labels.flip(2, 3).permute(0, 1, 4, 2, 3)
    # new voxel (k, i', j') is old voxel (5 - i', 6 - j', k)
    to_old = torch.tensor([[0, -1.0, 0, 5], [0, 0, -1.0, 6], [1.0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    stored_affine = affine @ to_old
    back = spatial.resample_to_grid(stored, stored_affine, affine, (6, 7, 8))
    torch.testing.assert_close(back, image)
    back_labels = spatial.resample_to_grid(labels_stored, stored_affine, affine, (6, 7, 8), is_label=True)
    assert torch.equal(back_labels, labels)


def test_resample_to_grid_on_another_voxel_size_is_exact_for_linear_images():
    slope = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    source_affine = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    image = torch.einsum("i,i...->...", slope, spatial.identity_grid((20, 20, 20), dtype=torch.float64))[None, None]
    target_affine = torch.diag(torch.tensor([2.0, 1.5, 2.5, 1.0], dtype=torch.float64))
    target_affine[:3, 3] = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    resampled = spatial.resample_to_grid(image, source_affine, target_affine, (8, 10, 6))
    world = spatial.grid_coordinates(source_affine, target_affine, (8, 10, 6))[0]  # source voxels = mm here
    torch.testing.assert_close(resampled[0, 0], torch.einsum("i,i...->...", slope, world))
    outside = spatial.resample_to_grid(image, source_affine, target_affine, (12, 14, 10))
    assert outside[0, 0, -1, -1, -1] == 0  # beyond the source field of view: zero


def test_ddf_to_grid_maps_every_point_where_the_field_on_the_other_grid_maps_it(generator):
    """A field on a reoriented 2 mm grid (UniReg's paper geometry) brought onto a 1 mm grid moves each world point of
    the 1 mm grid to the same world point as the original field (affine fields: trilinear is exact); outside the
    2 mm grid nothing moves."""
    source_affine = torch.diag(torch.tensor([-2.0, -2.0, 2.0, 1.0], dtype=torch.float64))
    source_affine[:3, 3] = torch.tensor([30.0, 26.0, -4.0], dtype=torch.float64)
    target_affine = torch.eye(4, dtype=torch.float64)
    source_shape, target_shape = (16, 14, 12), (40, 34, 26)
    matrix = 0.05 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    grid = spatial.identity_grid(source_shape, dtype=torch.float64)
    ddf = (torch.einsum("ij,j...->i...", matrix, grid) + 0.5)[None]
    moved = spatial.ddf_to_grid(ddf, source_affine, target_affine, target_shape)
    q = spatial.grid_coordinates(source_affine, target_affine, target_shape)[0]
    inside = ((q >= 0) & (q <= torch.tensor(source_shape, dtype=torch.float64).view(3, 1, 1, 1) - 1)).all(dim=0)
    assert inside.sum() > 100 and (~inside).sum() > 100
    p = spatial.identity_grid(target_shape, dtype=torch.float64)
    u_q = torch.einsum("ij,j...->i...", matrix, q) + 0.5
    expected_world = torch.einsum("ij,j...->i...", source_affine[:3, :3], q + u_q) + source_affine[:3, 3].view(
        3, 1, 1, 1
    )
    world = torch.einsum("ij,j...->i...", target_affine[:3, :3], p + moved[0]) + target_affine[:3, 3].view(3, 1, 1, 1)
    torch.testing.assert_close(world[:, inside], expected_world[:, inside])
    far = (q < -1).any(dim=0) | (q > torch.tensor(source_shape, dtype=torch.float64).view(3, 1, 1, 1)).any(dim=0)
    assert far.any() and moved[0][:, far].abs().max() == 0


def test_compose_with_an_outer_field_on_a_coarser_grid_is_exact_for_affine_fields(generator):
    """An affine field is reproduced exactly by trilinear interpolation, so composing it from a coarse grid at the
    fine grid's points must give the analytic composition ``A_outer (x + u_inner(x)) + b`` in fine voxels."""
    fine, coarse = (17, 21, 13), (9, 6, 5)
    matrix = 0.1 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    offset = torch.randn(3, generator=generator, dtype=torch.float64)

    def affine_field(shape):  # in normalised [0, 1] units: u(p) = A p + b, p in [0, 1]^3
        points = spatial.identity_grid(shape, dtype=torch.float64) / torch.tensor(
            [s - 1 for s in shape], dtype=torch.float64
        ).view(3, 1, 1, 1)
        return (torch.einsum("ij,j...->i...", matrix, points) + offset.view(3, 1, 1, 1))[None], points

    outer_unit, _ = affine_field(coarse)
    outer = outer_unit * torch.tensor([s - 1 for s in coarse], dtype=torch.float64).view(1, 3, 1, 1, 1)
    inner = 0.5 * torch.randn(1, 3, *fine, generator=generator, dtype=torch.float64)
    composed = spatial.compose(outer, inner)
    fine_scale = torch.tensor([s - 1 for s in fine], dtype=torch.float64).view(1, 3, 1, 1, 1)
    points = spatial.identity_grid(fine, dtype=torch.float64)[None] + inner
    reached = points / fine_scale
    inside = ((reached >= 0) & (reached <= 1)).all(1, keepdim=True).expand(-1, 3, -1, -1, -1)
    expected = inner + (torch.einsum("ij,bj...->bi...", matrix, reached) + offset.view(1, 3, 1, 1, 1)) * fine_scale
    torch.testing.assert_close(composed[inside], expected[inside], atol=1e-9, rtol=0)
    torch.testing.assert_close(
        spatial.compose(outer, torch.zeros(1, 3, *fine, dtype=torch.float64)), spatial.resize_ddf(outer, fine)
    )


@pytest.fixture
def threads():
    """Set the torch thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 4])
@pytest.mark.parametrize("batch,channels", [(1, 1), (1, 3), (2, 3)])
def test_threaded_grid_sample_equals_grid_sample_bit_for_bit(generator, threads, num_threads, batch, channels):
    """The slab split across threads (odd lengths leave a partial last slab) changes neither values nor gradients."""
    threads(num_threads)
    image = torch.randn(batch, channels, 9, 10, 11, generator=generator, requires_grad=True)
    grid = (torch.rand(batch, 7, 6, 5, 3, generator=generator) * 2.4 - 1.2).requires_grad_(True)
    ours = spatial._grid_sample(image, grid, "bilinear", "border")
    reference = torch.nn.functional.grid_sample(image, grid, padding_mode="border", align_corners=True)
    assert ours.is_contiguous() or batch * channels == 1
    assert torch.equal(ours, reference)
    weights = torch.randn(reference.shape, generator=generator)
    ours_grads = torch.autograd.grad((ours * weights).sum(), (image, grid))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (image, grid))
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_warp_without_autograd_equals_the_differentiable_path(generator, threads, num_threads):
    """Without autograd the sampling grid is written in place in the slab layout; the values must not change.

    Also with a MONAI ``MetaTensor`` and a channels-last field (what the networks pass)."""
    from monai.data import MetaTensor

    threads(num_threads)
    image = MetaTensor(torch.randn(1, 3, 11, 8, 9, generator=generator))
    field = smooth_field(generator, (11, 8, 9)).float()
    with torch.no_grad():
        fast = spatial.warp(image, field)
        fast_channels_last = spatial.warp(image, field.contiguous(memory_format=torch.channels_last_3d))
        composed = spatial.compose(image.as_tensor(), field)
    differentiable = spatial.warp(image, field.clone().requires_grad_(True))
    torch.testing.assert_close(fast.as_tensor(), differentiable.as_tensor().detach(), rtol=0, atol=1e-5)
    assert torch.equal(fast.as_tensor(), fast_channels_last.as_tensor())
    torch.testing.assert_close(composed, field + fast.as_tensor(), rtol=0, atol=1e-5)
