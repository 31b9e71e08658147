"""LNCCLoss against a direct float64 reference (full 3D window, explicit zero padding) and MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from scipy import ndimage

from monai_unireg.filtering import separable_filter
from monai_unireg.losses import LNCCLoss, window_kernel


def reference_kernel(kernel_type: str, sigma: float, size: int) -> np.ndarray:
    if kernel_type == "box":
        return np.full(size, 1.0 / size)
    offsets = np.arange(size) - size // 2
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def reference_lncc(a: np.ndarray, b: np.ndarray, kernel_1d: np.ndarray, eps: float) -> np.ndarray:
    """Windowed moments by one full n-D correlation per moment (no separability), zeros outside the image."""
    window = kernel_1d
    for _ in range(a.ndim - 1):
        window = np.multiply.outer(window, kernel_1d)

    def mean(x: np.ndarray) -> np.ndarray:
        return ndimage.correlate(x, window, mode="constant", cval=0.0)

    mean_a, mean_b = mean(a), mean(b)
    var_a = np.maximum(mean(a * a) - mean_a**2, 0.0)
    var_b = np.maximum(mean(b * b) - mean_b**2, 0.0)
    cov = mean(a * b) - mean_a * mean_b
    return cov / np.sqrt((var_a + eps) * (var_b + eps))


def smooth_random(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    noise = torch.rand(shape, generator=generator, dtype=dtype)
    return torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)


@pytest.mark.parametrize(
    "kernel_type, sigma, kernel_size, expected_size",
    [
        ("gaussian", 5.0, None, 21),
        ("gaussian", 1.5, None, 7),
        ("gaussian", 2.0, 5, 5),
        ("box", 5.0, None, 9),
        ("box", 1.0, 5, 5),
    ],
)
@pytest.mark.parametrize("squared", [False, True])
def test_matches_direct_reference(kernel_type, sigma, kernel_size, expected_size, squared, generator):
    a = torch.rand(2, 1, 10, 9, 8, generator=generator, dtype=torch.float64)
    b = 0.5 * a + torch.rand(2, 1, 10, 9, 8, generator=generator, dtype=torch.float64)
    loss = LNCCLoss(kernel_type=kernel_type, sigma=sigma, kernel_size=kernel_size, squared=squared, reduction="none")
    assert loss.kernel.shape == (expected_size,)
    got = loss(a, b)
    kernel = reference_kernel(kernel_type, sigma, expected_size)
    for i in range(2):
        lncc = reference_lncc(a[i, 0].numpy(), b[i, 0].numpy(), kernel, eps=1e-5)
        expected = 1.0 - (lncc**2 if squared else lncc)
        np.testing.assert_allclose(got[i, 0].numpy(), expected, rtol=0, atol=1e-10)
    mean_loss = LNCCLoss(kernel_type=kernel_type, sigma=sigma, kernel_size=kernel_size, squared=squared)(a, b)
    assert torch.allclose(mean_loss, got.mean(), atol=1e-12)


def test_two_dimensional_and_multichannel(generator):
    a = torch.rand(1, 2, 16, 11, generator=generator, dtype=torch.float64)
    b = torch.rand(1, 2, 16, 11, generator=generator, dtype=torch.float64)
    got = LNCCLoss(spatial_dims=2, sigma=2.0, reduction="none")(a, b)
    kernel = reference_kernel("gaussian", 2.0, 9)
    for c in range(2):
        expected = 1.0 - reference_lncc(a[0, c].numpy(), b[0, c].numpy(), kernel, eps=1e-5)
        np.testing.assert_allclose(got[0, c].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("padding_mode, scipy_mode", [("zeros", "constant"), ("replicate", "nearest")])
@pytest.mark.parametrize("shape", [(9,), (7, 6), (2, 8, 5, 6)])
def test_separable_filter_matches_scipy(padding_mode, scipy_mode, shape, generator):
    kernel = torch.tensor([0.1, 0.2, 0.05, 0.4, 0.25], dtype=torch.float64)
    x = torch.rand(3, *shape, generator=generator, dtype=torch.float64)
    spatial_dims = min(len(shape), 3)
    got = separable_filter(x, kernel, spatial_dims, padding_mode)
    expected = x.numpy()
    for axis in range(x.ndim - spatial_dims, x.ndim):
        expected = ndimage.correlate1d(expected, kernel.numpy(), axis=axis, mode=scipy_mode)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="padding_mode"):
        separable_filter(x, kernel, spatial_dims, "reflect")


@pytest.mark.parametrize("padding_mode, scipy_mode", [("zeros", "constant"), ("replicate", "nearest")])
def test_separable_filter_by_band_blocks_matches_scipy_and_the_full_band(padding_mode, scipy_mode, generator):
    """Axes long enough for the blocked products (first and last), and the full band matrices that autograd uses."""
    kernel = torch.tensor([0.05, 0.1, 0.1, 0.15, 0.2, 0.15, 0.1, 0.1, 0.05], dtype=torch.float64)
    x = torch.rand(2, 41, 7, 83, generator=generator, dtype=torch.float64)
    got = separable_filter(x, kernel, 3, padding_mode)
    expected = x.numpy()
    for axis in (1, 2, 3):
        expected = ndimage.correlate1d(expected, kernel.numpy(), axis=axis, mode=scipy_mode)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    full_band = separable_filter(x.clone().requires_grad_(True), kernel, 3, padding_mode)
    torch.testing.assert_close(got, full_band.detach(), atol=1e-12, rtol=0)


def test_separable_filter_reuses_matrices_only_for_the_same_weights(generator):
    """The banded matrices are kept between calls by weights, size, padding and dtype: another kernel of the same
    length, another padding or dtype gives its own result, and a kernel with a gradient still receives it."""
    x = torch.rand(2, 6, 7, 8, generator=generator, dtype=torch.float64)
    first = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    second = torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64)
    a, b = separable_filter(x, first, 3), separable_filter(x, second, 3)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(separable_filter(x, first, 3), a, atol=0, rtol=0)
    assert not torch.allclose(separable_filter(x, first, 3, "replicate"), a)
    torch.testing.assert_close(separable_filter(x.float(), first, 3), a.float(), atol=1e-6, rtol=0)
    learnable = first.clone().requires_grad_(True)
    separable_filter(x, learnable, 3).sum().backward()
    assert learnable.grad is not None and float(learnable.grad.abs().sum()) > 0


def test_window_kernel_defaults():
    gaussian = window_kernel()
    assert gaussian.shape == (21,) and torch.isclose(gaussian.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.argmax(gaussian) == 10 and torch.allclose(gaussian, gaussian.flip(0))
    assert torch.allclose(window_kernel("box"), torch.full((9,), 1 / 9, dtype=torch.float64))


def test_identical_and_negated_images(generator):
    a = smooth_random((1, 1, 20, 20, 20), generator, torch.float32) * 100.0
    loss = LNCCLoss(sigma=2.0)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-4)
    assert loss(a, -a).item() == pytest.approx(2.0, abs=1e-4)
    assert LNCCLoss(sigma=2.0, squared=True)(a, -a).item() == pytest.approx(0.0, abs=1e-4)
    assert loss(a, 3.0 * a + 7.0).item() == pytest.approx(0.0, abs=1e-4)


def test_finite_on_constant_images():
    a = torch.full((1, 1, 12, 12, 12), 0.7, requires_grad=True)
    b = torch.full((1, 1, 12, 12, 12), 0.2)
    for kernel_type in ("gaussian", "box"):
        value = LNCCLoss(kernel_type=kernel_type)(a, b)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(a.grad).all()
        a.grad = None
    zeros = torch.zeros(1, 1, 12, 12, 12)
    assert LNCCLoss()(zeros, zeros).item() == pytest.approx(1.0)


def test_float16_input_computed_in_float32(generator):
    a = smooth_random((1, 1, 16, 16, 16), generator, torch.float32).half()
    b = smooth_random((1, 1, 16, 16, 16), generator, torch.float32).half()
    loss = LNCCLoss(sigma=2.0)
    value = loss(a, b)
    assert value.dtype == torch.float32
    assert torch.allclose(value, loss(a.float(), b.float()), atol=1e-6)


def test_batch_gives_per_sample_values(generator):
    a = torch.rand(2, 1, 12, 10, 14, generator=generator)
    b = torch.rand(2, 1, 12, 10, 14, generator=generator)
    b[1] = 0.8 * a[1] + 0.2 * b[1]
    loss = LNCCLoss(sigma=2.0, reduction="none")
    batched = loss(a, b).flatten(1).mean(1)
    singles = torch.stack([loss(a[i : i + 1], b[i : i + 1]).mean() for i in range(2)])
    assert torch.allclose(batched, singles, atol=1e-6)
    assert batched[1] < batched[0] - 0.3
    assert torch.allclose(LNCCLoss(sigma=2.0)(a, b), singles.mean(), atol=1e-6)
    assert torch.allclose(LNCCLoss(sigma=2.0, reduction="sum")(a, b), loss(a, b).sum(), rtol=1e-6)


def test_gradient_flows_and_is_correct(generator):
    a = torch.rand(1, 1, 5, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 5, 4, 6, generator=generator, dtype=torch.float64)
    loss = LNCCLoss(kernel_type="gaussian", sigma=1.0, squared=True)
    assert torch.autograd.gradcheck(lambda x: loss(x, b), (a,))
    loss(a, b).backward()
    assert a.grad.abs().sum() > 0


def test_like_for_like_with_monai(generator):
    a = torch.rand(2, 1, 24, 20, 22, generator=generator)
    b = 0.3 * a + torch.rand(2, 1, 24, 20, 22, generator=generator)
    monai = LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian", kernel_size=21)(a, b)
    ours = LNCCLoss(sigma=7.0, kernel_size=21, squared=True, eps=1e-12)(a, b)
    assert (ours - 1.0).item() == pytest.approx(monai.item(), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_type": "foo"}, "kernel_type"),
        ({"reduction": "foo"}, "reduction"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"sigma": -1.0}, "sigma"),
        ({"eps": 0.0}, "eps"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"squared": 1}, "squared"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LNCCLoss(**kwargs)


def test_bad_inputs():
    loss = LNCCLoss()
    good = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="pred"):
        loss(torch.rand(1, 8, 8, 8), good)
    with pytest.raises(ValueError, match="target"):
        loss(good, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pred and target"):
        loss(good, torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="pred and target"):
        loss(good, torch.rand(2, 1, 8, 8, 8))
    for bad in (float("nan"), float("inf")):
        corrupted = good.clone()
        corrupted[0, 0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="target"):
            loss(good, corrupted)
    with pytest.raises(ValueError, match="pred"):
        loss(good.numpy(), good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(generator):
    a = torch.rand(2, 1, 20, 18, 16, generator=generator)
    b = torch.rand(2, 1, 20, 18, 16, generator=generator)
    for loss in (LNCCLoss(), LNCCLoss(kernel_type="box", squared=True)):
        expected = loss(a, b)
        got = loss.to("cuda")(a.cuda(), b.cuda())
        assert got.device.type == "cuda" and torch.allclose(got.cpu(), expected, atol=1e-5)
