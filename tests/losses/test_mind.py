"""MINDSSC / MINDSSCLoss against an independent float64 reference and the descriptor's invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_unireg.losses import MINDSSC, SSC_EDGES, MINDSSCLoss


def reference_mind(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """One volume ``[D, H, W]`` -> ``[12, D, H, W]``: edge-replicated shifts, box filter with 'nearest' borders."""
    padded = np.pad(image, dilation, mode="edge")
    size = image.shape

    def shifted(offset: tuple[int, int, int]) -> np.ndarray:
        start = [dilation + dilation * o for o in offset]
        return padded[tuple(slice(s, s + n) for s, n in zip(start, size))]

    distances = np.stack(
        [
            ndimage.uniform_filter((shifted(p) - shifted(q)) ** 2, size=2 * radius + 1, mode="nearest")
            for p, q in SSC_EDGES
        ]
    )
    distances -= distances.min(axis=0)
    variance = distances.mean(axis=0)
    variance = np.clip(variance, 1e-3 * variance.mean(), 1e3 * variance.mean())
    return np.exp(-distances / variance)


def smooth_volume(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    noise = torch.rand(shape, generator=generator, dtype=dtype)
    return torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)


def test_edge_table_is_the_self_similarity_context():
    assert len(SSC_EDGES) == 12
    assert len({frozenset(edge) for edge in SSC_EDGES}) == 12
    faces = {o for o in itertools.product((-1, 0, 1), repeat=3) if sum(map(abs, o)) == 1}
    for p, q in SSC_EDGES:
        assert p in faces and q in faces
        assert sum((a - b) ** 2 for a, b in zip(p, q)) == 2


@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 1), (0, 3)])
def test_matches_reference(radius, dilation, generator):
    image = smooth_volume((2, 1, 13, 11, 15), generator)
    got = MINDSSC(radius=radius, dilation=dilation)(image)
    assert got.shape == (2, 12, 13, 11, 15) and got.dtype == torch.float64
    for i in range(2):
        expected = reference_mind(image[i, 0].numpy(), radius, dilation)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_and_8_bit_quantised_regions_match_the_reference(dtype, generator):
    """The authors' MIND (ConvexAdam / Learn2Reg) on an exactly flat background and 8-bit intensities: the variance
    clamp at 1e-3 of the mean keeps exact-zero distances finite, and a flat region is exactly 1 in every channel."""
    image = torch.zeros(1, 1, 24, 24, 24, dtype=torch.float64)
    image[..., 6:18, 6:18, 6:18] = torch.round(smooth_volume((1, 1, 12, 12, 12), generator) * 255) / 255
    got = MINDSSC(radius=2, dilation=2)(image.to(dtype))
    expected = reference_mind(image[0, 0].numpy(), 2, 2)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got[0].double().numpy(), expected, rtol=0, atol=tolerance)
    far_from_the_object = got[0, :, :1, :, :]  # 4 voxels (radius + dilation) and more from the textured cube
    assert torch.equal(far_from_the_object, torch.ones_like(far_from_the_object))


def test_values_in_unit_interval_with_maximum_one(generator):
    mind = MINDSSC()(smooth_volume((1, 1, 12, 12, 12), generator))
    assert mind.min() > 0 and mind.max() <= 1.0
    assert torch.allclose(mind.amax(dim=1), torch.ones(1, 12, 12, 12, dtype=torch.float64))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_invariant_to_affine_intensity_change(dtype, atol, generator):
    image = smooth_volume((1, 1, 14, 14, 14), generator, dtype)
    descriptor = MINDSSC()
    reference = descriptor(image)
    for a, b in ((3.7, -12.0), (0.05, 2.0), (250.0, 1000.0)):
        assert torch.allclose(descriptor(a * image + b), reference, atol=atol)


def test_batch_samples_are_independent(generator):
    images = smooth_volume((2, 1, 10, 12, 11), generator)
    images[1] *= 40.0
    descriptor = MINDSSC()
    batched = descriptor(images)
    for i in range(2):
        assert torch.allclose(batched[i : i + 1], descriptor(images[i : i + 1]), atol=1e-12)


def test_loss_zero_for_identical_and_growing_with_shift(generator):
    volume = smooth_volume((1, 1, 30, 24, 24), generator, torch.float32)
    fixed = volume[:, :, 3:27]
    loss = MINDSSCLoss()
    assert loss(fixed, fixed).item() == pytest.approx(0.0, abs=1e-12)
    values = [loss(volume[:, :, 3 + s : 27 + s], fixed).item() for s in range(4)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(later > earlier for earlier, later in zip(values, values[1:]))


def test_reductions_and_gradient(generator):
    pred = smooth_volume((2, 1, 8, 9, 10), generator, torch.float32).requires_grad_()
    target = smooth_volume((2, 1, 8, 9, 10), generator, torch.float32)
    per_voxel = MINDSSCLoss(reduction="none")(pred, target)
    assert per_voxel.shape == (2, 12, 8, 9, 10)
    assert torch.allclose(MINDSSCLoss()(pred, target), per_voxel.mean())
    assert torch.allclose(MINDSSCLoss(reduction="sum")(pred, target), per_voxel.sum(), rtol=1e-5)
    MINDSSCLoss()(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gradient_is_correct(generator):
    pred = smooth_volume((1, 1, 4, 5, 4), generator).requires_grad_()
    target = smooth_volume((1, 1, 4, 5, 4), generator)
    loss = MINDSSCLoss(radius=1, dilation=1)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (pred,))


def test_constant_image_is_finite():
    flat = torch.full((1, 1, 8, 8, 8), 3.0, requires_grad=True)
    assert torch.equal(MINDSSC()(flat), torch.ones(1, 12, 8, 8, 8))
    value = MINDSSCLoss()(flat, torch.rand(1, 1, 8, 8, 8))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(flat.grad).all()


def test_float16_input_gives_float32(generator):
    image = smooth_volume((1, 1, 10, 10, 10), generator, torch.float32).half()
    mind = MINDSSC()(image)
    assert mind.dtype == torch.float32
    assert torch.allclose(mind, MINDSSC()(image.float()))
    assert MINDSSCLoss()(image, image.flip(2)).dtype == torch.float32


def test_bad_inputs():
    good = torch.rand(1, 1, 8, 8, 8)
    loss = MINDSSCLoss()
    with pytest.raises(ValueError, match="pred"):
        loss(torch.rand(1, 2, 8, 8, 8), good)
    with pytest.raises(ValueError, match="target"):
        loss(good, torch.rand(1, 8, 8, 8))
    with pytest.raises(ValueError, match="image"):
        MINDSSC()(torch.rand(8, 8, 8))
    with pytest.raises(ValueError, match="pred and target"):
        loss(good, torch.rand(1, 1, 8, 8, 7))
    nan = good.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred"):
        loss(nan, good)
    with pytest.raises(ValueError, match="target"):
        loss(good, good.masked_fill(good > 0.5, float("inf")))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "foo"}, "reduction"),
        ({"radius": -1}, "radius"),
        ({"dilation": 0}, "dilation"),
        ({"radius": 1.5}, "radius"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MINDSSCLoss(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(generator):
    pred = smooth_volume((2, 1, 12, 14, 10), generator, torch.float32)
    target = smooth_volume((2, 1, 12, 14, 10), generator, torch.float32)
    expected = MINDSSCLoss()(pred, target)
    got = MINDSSCLoss()(pred.cuda(), target.cuda())
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), expected, rtol=1e-4)
    half = MINDSSC()(pred.cuda().half())
    assert half.dtype == torch.float32 and torch.allclose(half.cpu(), MINDSSC()(pred.half().float()), atol=1e-4)
