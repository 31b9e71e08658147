"""Tests of the CT window and MRI percentile normalisations (array and dictionary versions)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged

from monai_unireg.transforms import CT_WINDOW_PRESETS, CTWindow, CTWindowd, MRIPercentile, MRIPercentiled


def _hu_ramp() -> torch.Tensor:
    """``[1, 7, 1, 1]`` HU values below, at and above the default window."""
    return torch.tensor([-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 3000.0]).reshape(1, 7, 1, 1)


def test_ct_window_maps_ends_and_clips():
    out = CTWindow(a_min=-1000, a_max=1000)(_hu_ramp()).flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_ct_window_range_and_output_range_are_arguments():
    out = CTWindow(a_min=-800, a_max=400, b_min=-1.0, b_max=1.0)(_hu_ramp()).flatten()
    expected = torch.clamp((_hu_ramp().flatten() + 800) / 1200, 0, 1) * 2 - 1
    torch.testing.assert_close(out, expected)
    assert out.min() == -1.0 and out.max() == 1.0


@pytest.mark.parametrize("method", sorted(CT_WINDOW_PRESETS))
def test_ct_window_presets(method):
    a_min, a_max, b_min, b_max = CT_WINDOW_PRESETS[method]
    image = torch.tensor([a_min - 10, a_min, a_max, a_max + 10]).reshape(1, 4, 1, 1)
    out = CTWindow.from_preset(method)(image).flatten()
    torch.testing.assert_close(out, torch.tensor([b_min, b_min, b_max, b_max]))


def test_ct_window_preset_values_follow_the_papers():
    assert CT_WINDOW_PRESETS["unigradicon"][:2] == (-1000.0, 1000.0)
    assert CT_WINDOW_PRESETS["voxelopt"][:2] == (-800.0, 500.0)
    assert CT_WINDOW_PRESETS["unireg"] == (-800.0, 400.0, -1.0, 1.0)


def test_ct_window_int16_numpy_and_metatensor():
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.tensor([[-1000, 0, 1000]], dtype=torch.int16).reshape(1, 3, 1, 1), affine=affine)
    out = CTWindow()(image)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.affine, affine)
    from_numpy = CTWindow()(np.array([[0, 1000]], dtype=np.int16))
    torch.testing.assert_close(torch.as_tensor(from_numpy), torch.tensor([[0.5, 1.0]]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"a_min": 100, "a_max": 100}, "a_min"),
        ({"a_min": 500, "a_max": -500}, "a_min"),
        ({"b_min": 1.0, "b_max": 0.0}, "b_min"),
        ({"a_min": float("nan")}, "a_min"),
        ({"a_max": "1000"}, "a_max"),
    ],
)
def test_ct_window_bad_range(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CTWindow(**kwargs)


def test_ct_window_unknown_preset():
    with pytest.raises(ValueError, match="method"):
        CTWindow.from_preset("lapirn")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_images_are_rejected(bad):
    image = torch.zeros(1, 4, 4, 4)
    image[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        CTWindow()(image)
    with pytest.raises(ValueError, match="NaN or Inf"):
        MRIPercentile()(image)
    with pytest.raises(ValueError, match="fixed_image"):
        MRIPercentiled("fixed_image")({"fixed_image": image})


def test_mri_percentile_maps_min_and_percentile(generator):
    image = torch.rand(1, 10, 12, 14, generator=generator) * 300 + 20
    out = MRIPercentile(percentile=99)(image)
    low, high = image.min(), torch.quantile(image.flatten(), 0.99)
    expected = torch.clamp((image - low) / (high - low), 0, 1)
    torch.testing.assert_close(out, expected)
    assert out.min() == 0.0 and out.max() == 1.0
    assert abs(float((out == 1.0).float().mean()) - 0.01) < 0.002  # the top 1 % is clipped to 1


def test_mri_percentile_is_an_argument():
    image = torch.arange(101.0).reshape(1, 101, 1, 1)
    out = MRIPercentile(percentile=50)(image).flatten()
    assert out[0] == 0.0 and out[50] == 1.0 and out[25] == 0.5 and bool((out[50:] == 1.0).all())
    torch.testing.assert_close(MRIPercentile(percentile=100)(image).flatten(), image.flatten() / 100)


def test_mri_percentile_output_range_numpy_and_meta():
    image = MetaTensor(torch.arange(101.0).reshape(1, 101, 1, 1), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
    out = MRIPercentile(percentile=100, b_min=-1.0, b_max=1.0)(image)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, image.affine)
    assert out.min() == -1.0 and out.max() == 1.0
    out_np = MRIPercentile(percentile=100)(np.arange(11, dtype=np.int16).reshape(1, 11, 1, 1))
    torch.testing.assert_close(torch.as_tensor(out_np).flatten(), torch.arange(11.0) / 10)


def test_mri_percentile_constant_image_is_finite_zeros():
    out = MRIPercentile()(torch.full((1, 5, 5, 5), 7.0))
    assert bool(torch.isfinite(out).all()) and bool((out == 0).all())


def test_mri_percentile_channel_wise():
    image = torch.stack([torch.arange(101.0), 10 * torch.arange(101.0) + 5]).reshape(2, 101, 1, 1)
    per_channel = MRIPercentile(percentile=100, channel_wise=True)(image).reshape(2, -1)
    torch.testing.assert_close(per_channel[0], per_channel[1])
    joint = MRIPercentile(percentile=100)(image).reshape(2, -1)
    assert joint[0].max() < 0.1  # channel 0 is dark relative to channel 1 when normalised together


@pytest.mark.parametrize("percentile", [0, -5, 100.5, 250, float("nan"), True, "99"])
def test_mri_percentile_bad_percentile(percentile):
    with pytest.raises(ValueError, match="percentile"):
        MRIPercentile(percentile=percentile)


def test_dictionary_versions_and_missing_keys():
    data = {"fixed_image": _hu_ramp(), "moving_image": _hu_ramp() * 0.5, "dataset": "x"}
    out = CTWindowd(("fixed_image", "moving_image"))(data)
    torch.testing.assert_close(out["fixed_image"], CTWindow()(data["fixed_image"]))
    torch.testing.assert_close(out["moving_image"], CTWindow()(data["moving_image"]))
    assert out["dataset"] == "x" and data["fixed_image"].min() == -3000  # input dict untouched
    with pytest.raises(KeyError):
        MRIPercentiled(("fixed_image", "missing"))(data)
    out = MRIPercentiled(("fixed_image", "missing"), allow_missing_keys=True)(data)
    assert out["fixed_image"].max() == 1.0 and "missing" not in out
    preset = CTWindowd.from_preset("fixed_image", "unireg")(data)
    assert preset["fixed_image"].min() == -1.0


def test_inside_compose_with_loadimaged_on_shared_ct(shared_data):
    image_path = shared_data / "CTTotalSeg" / "imagesTr" / "CTTotalSeg_0001_0000.nii.gz"
    load = LoadImaged("image", ensure_channel_first=True, image_only=True)
    loaded = load({"image": str(image_path)})["image"]
    out = Compose([load, CTWindowd("image", a_min=-1000, a_max=1000)])({"image": str(image_path)})["image"]
    hu = torch.as_tensor(np.asarray(nib.load(image_path).dataobj, dtype=np.float32))[None]
    assert isinstance(out, MetaTensor) and out.shape == (1, 122, 101, 30)
    torch.testing.assert_close(out.as_tensor(), torch.clamp((hu + 1000) / 2000, 0, 1))
    torch.testing.assert_close(out.affine, loaded.affine)


def test_inside_compose_with_loadimaged_on_shared_mr_pair(shared_data):
    root = shared_data / "BrainSynth" / "imagesTr"
    data = {
        "fixed_image": str(root / "BrainSynth_0001_0000.nii.gz"),
        "moving_image": str(root / "BrainSynth_0002_0000.nii.gz"),
    }
    keys = ("fixed_image", "moving_image")
    out = Compose([LoadImaged(keys, ensure_channel_first=True), MRIPercentiled(keys, percentile=99)])(data)
    for key in keys:
        raw = torch.as_tensor(np.asarray(nib.load(data[key]).dataobj, dtype=np.float32))
        high = np.percentile(raw.numpy(), 99)
        assert out[key].shape == (1, 80, 96, 96) and out[key].min() == 0.0 and out[key].max() == 1.0
        torch.testing.assert_close(out[key][0].as_tensor(), torch.clamp((raw - raw.min()) / (high - raw.min()), 0, 1))
