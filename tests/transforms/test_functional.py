"""The plain-torch intensity normalisations (transforms.functional) against the MONAI transforms they mirror."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile as monai_percentile

from monai_unireg.transforms import modality_normaliser
from monai_unireg.transforms.functional import normalise_modality, percentile


def _image(numel: int, seed: int = 0) -> torch.Tensor:
    """``[1, numel]`` intensities in HU-like range with repeated values (8-bit levels), float32."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (1, numel), generator=generator).float() * 9.7 - 1200.0).contiguous()


# 1_000_000 values and fewer by order statistics (torch.kthvalue), more through numpy.percentile (as MONAI's)
@pytest.mark.parametrize("numel", [4_096, 1_000_000, 1_000_001])
def test_percentile_is_monais(numel: int) -> None:
    image = _image(numel)
    expected = torch.as_tensor(monai_percentile(image, 99.0), dtype=image.dtype)
    assert torch.equal(percentile(image, 99.0), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1, 2, 7, 10_001])
def test_percentile_of_continuous_values_is_monais_bit_for_bit(dtype, numel) -> None:
    """Distinct values (every percentile between two order statistics), all values or per row, and NaN."""
    generator = torch.Generator().manual_seed(numel)
    rows = torch.randn(3, numel, generator=generator).to(dtype)
    for q in (0.0, 1.0, 37.3, 99.0, 100.0):
        expected = torch.as_tensor(monai_percentile(rows[:1], q), dtype=dtype)
        assert torch.equal(percentile(rows[:1], q), expected), q
        assert torch.equal(percentile(rows, q, dim=1), torch.as_tensor(monai_percentile(rows, q, dim=1), dtype=dtype))
    rows[1, 0] = torch.nan
    assert percentile(rows, 50.0, dim=1).isnan().tolist() == [False, True, False] and percentile(rows, 50.0).isnan()


@pytest.mark.parametrize("numel", [4_096, 1_000_001])
@pytest.mark.parametrize("modality", ["ct", "mri"])
@pytest.mark.parametrize("output_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_normalise_modality_is_bit_identical_to_the_transforms(numel, modality, output_range) -> None:
    image = _image(numel, seed=numel)
    expected = torch.as_tensor(modality_normaliser(modality, (-800.0, 500.0), output_range)(image))
    result = normalise_modality(image, modality, (-800.0, 500.0), output_range)
    assert type(result) is torch.Tensor and result.dtype == torch.float32
    assert torch.equal(result, expected.as_subclass(torch.Tensor))


def test_ct_window_is_monais_scale_intensity_range() -> None:
    image = _image(10_000)
    expected = ScaleIntensityRange(a_min=-800.0, a_max=400.0, b_min=-1.0, b_max=1.0, clip=True)(image)
    assert torch.equal(
        normalise_modality(image, "ct", (-800.0, 400.0), (-1.0, 1.0)), expected.as_subclass(torch.Tensor)
    )


def test_constant_mri_image_maps_to_b_min() -> None:
    assert torch.equal(
        normalise_modality(torch.full((1, 50), 7.0), "mri", output_range=(-1.0, 1.0)), torch.full((1, 50), -1.0)
    )
