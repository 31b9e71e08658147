"""Tests of the pair dictionary transforms: checks, resizing, restoring fields and warping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose, CopyItemsd, LoadImaged

from monai_unireg.transforms import (
    CheckPaird,
    MRIPercentiled,
    ResizeDDF,
    ResizePaird,
    RestoreDDFd,
    WarpImaged,
    WarpLabeld,
)

ORIGINAL = (21, 17, 13)
NETWORK = (10, 8, 6)
LABEL_VALUES = (0, 3, 7, 42)


def _affine() -> torch.Tensor:
    affine = torch.diag(torch.tensor([2.0, -1.5, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-20.0, 14.0, 5.0], dtype=torch.float64)
    return affine


def _labels(generator: torch.Generator, shape=ORIGINAL, dtype=torch.int16) -> torch.Tensor:
    """Blocky label map ``[1, *shape]`` with the values of ``LABEL_VALUES``."""
    coarse = torch.randint(0, len(LABEL_VALUES), (1, 1, 4, 4, 4), generator=generator).float()
    index = torch.nn.functional.interpolate(coarse, size=shape, mode="nearest")[0].long()
    return torch.tensor(LABEL_VALUES, dtype=dtype)[index]


def _pair(generator: torch.Generator, meta: bool = False) -> dict:
    fixed, moving = torch.rand(2, 1, *ORIGINAL, generator=generator)
    data = {
        "fixed_image": fixed,
        "moving_image": moving,
        "fixed_label": _labels(generator),
        "moving_label": _labels(generator),
        "dataset": "toy",
    }
    if meta:
        for key in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
            data[key] = MetaTensor(data[key], affine=_affine(), meta={"filename_or_obj": f"{key}.nii.gz"})
    return data


def _voxel_to_world(affine: torch.Tensor, index) -> torch.Tensor:
    return (affine @ torch.tensor([*index, 1.0], dtype=torch.float64))[:3]


def test_resize_pair_images_are_corner_aligned_trilinear():
    ramp = torch.arange(ORIGINAL[0], dtype=torch.float32).view(1, -1, 1, 1).expand(1, *ORIGINAL).clone()
    out = ResizePaird(NETWORK)({"fixed_image": ramp, "moving_image": ramp * 2})
    expected = torch.arange(NETWORK[0]) * (ORIGINAL[0] - 1) / (NETWORK[0] - 1)
    torch.testing.assert_close(out["fixed_image"][0, :, 3, 2], expected)
    torch.testing.assert_close(out["moving_image"][0, :, 0, 0], 2 * expected)
    assert out["fixed_image"].shape == (1, *NETWORK)
    assert tuple(out["fixed_image_original_shape"].tolist()) == ORIGINAL


def test_resize_pair_labels_nearest_on_the_same_correspondence(generator):
    index_map = torch.arange(ORIGINAL[1], dtype=torch.int16).view(1, 1, -1, 1).expand(1, *ORIGINAL).clone()
    data = _pair(generator)
    data["fixed_label"] = index_map
    out = ResizePaird(NETWORK)(data)
    expected = torch.round(torch.arange(NETWORK[1], dtype=torch.float64) * (ORIGINAL[1] - 1) / (NETWORK[1] - 1))
    torch.testing.assert_close(out["fixed_label"][0, 0, :, 0], expected.to(torch.int16))
    assert out["moving_label"].dtype == torch.int16
    assert set(out["moving_label"].unique().tolist()) <= set(LABEL_VALUES)


def test_resize_pair_allows_different_fixed_and_moving_shapes(generator):
    data = {"fixed_image": torch.rand(1, 12, 10, 8, generator=generator), "moving_image": torch.rand(1, 9, 14, 30)}
    out = ResizePaird(8)(data)
    assert out["fixed_image"].shape == out["moving_image"].shape == (1, 8, 8, 8)
    assert out["moving_image_original_shape"].tolist() == [9, 14, 30]


def test_resize_pair_metatensor_affine_keeps_corner_voxels_in_place(generator):
    out = ResizePaird(NETWORK)(_pair(generator, meta=True))
    fixed = out["fixed_image"]
    assert isinstance(fixed, MetaTensor) and fixed.meta["filename_or_obj"] == "fixed_image.nii.gz"
    torch.testing.assert_close(out["fixed_image_original_affine"], _affine())
    last_network = [n - 1 for n in NETWORK]
    last_original = [n - 1 for n in ORIGINAL]
    torch.testing.assert_close(_voxel_to_world(fixed.affine, last_network), _voxel_to_world(_affine(), last_original))
    torch.testing.assert_close(_voxel_to_world(fixed.affine, [0, 0, 0]), _voxel_to_world(_affine(), [0, 0, 0]))
    torch.testing.assert_close(out["fixed_label"].affine, fixed.affine)


def test_restore_constant_field(generator):
    data = ResizePaird(NETWORK)(_pair(generator))
    k = torch.tensor([1.5, -2.0, 0.75])
    data["ddf"] = k.view(3, 1, 1, 1).expand(3, *NETWORK).clone()
    restored = RestoreDDFd("ddf")(data)["ddf"]
    assert restored.shape == (3, *ORIGINAL)
    factor = torch.tensor([(o - 1) / (n - 1) for o, n in zip(ORIGINAL, NETWORK)])
    torch.testing.assert_close(restored, (k * factor).view(3, 1, 1, 1).expand(3, *ORIGINAL))


def _analytic_displacement(points: torch.Tensor) -> torch.Tensor:
    """Smooth displacement in original voxels at original voxel coordinates ``points`` ``[3, *S]``."""
    x, y, z = points / torch.tensor(ORIGINAL, dtype=points.dtype).view(3, 1, 1, 1)
    return torch.stack([2.0 * torch.sin(np.pi * y) * z, 1.5 * torch.cos(np.pi * x), x * y - 0.5 * z])


def _grid(shape) -> torch.Tensor:
    """``[3, *shape]`` voxel index coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


def test_restore_smooth_field_agrees_with_sampling_at_original_resolution(generator):
    factor = torch.tensor([(o - 1) / (n - 1) for o, n in zip(ORIGINAL, NETWORK)], dtype=torch.float64).view(3, 1, 1, 1)
    network_points = _grid(NETWORK) * factor  # where the network voxels lie in original voxel coordinates
    data = ResizePaird(NETWORK)(_pair(generator))
    data["ddf"] = (_analytic_displacement(network_points) / factor).float()  # the same field in network voxels
    restored = RestoreDDFd()(data)["ddf"]
    truth = _analytic_displacement(_grid(ORIGINAL)).float()
    error = (restored - truth).abs().max()
    assert error < 0.05 * truth.abs().max(), float(error)
    unscaled = torch.nn.functional.interpolate(data["ddf"][None], size=ORIGINAL, mode="trilinear", align_corners=True)[
        0
    ]
    assert (unscaled - truth).abs().max() > 5 * error  # the value rescaling matters


def test_restore_keeps_the_original_fixed_metadata(generator):
    data = ResizePaird(NETWORK)(_pair(generator, meta=True))
    data["ddf"] = torch.zeros(3, *NETWORK)
    restored = RestoreDDFd()(data)["ddf"]
    assert isinstance(restored, MetaTensor)
    torch.testing.assert_close(restored.affine, _affine())
    assert restored.meta["filename_or_obj"] == "fixed_image.nii.gz"


def test_restore_after_collate_and_decollate(generator):
    items = [ResizePaird(NETWORK)(_pair(generator, meta=True)) for _ in range(2)]
    items[1]["fixed_image_original_affine"] = 2 * _affine()  # a second geometry
    batch = list_data_collate(items)
    batch["ddf"] = torch.ones(2, 3, *NETWORK)
    restored = [RestoreDDFd()(item)["ddf"] for item in decollate_batch(batch)]
    factor = torch.tensor([(o - 1) / (n - 1) for o, n in zip(ORIGINAL, NETWORK)])
    for item, affine in zip(restored, (_affine(), 2 * _affine())):
        assert item.shape == (3, *ORIGINAL)
        torch.testing.assert_close(item.as_tensor()[:, 4, 5, 6], factor)
        torch.testing.assert_close(item.affine, affine)


def test_restore_without_resize_record_uses_the_reference_shape(generator):
    data = _pair(generator)
    data["ddf"] = torch.ones(3, *NETWORK)
    restored = RestoreDDFd()(data)["ddf"]
    assert restored.shape == (3, *ORIGINAL) and not isinstance(restored, MetaTensor)
    with pytest.raises(ValueError, match="fixed_image"):
        RestoreDDFd()({"ddf": torch.zeros(3, *NETWORK)})


def test_restore_rejects_pairs_of_different_original_shapes(generator):
    data = ResizePaird(8)({"fixed_image": torch.rand(1, 12, 10, 8), "moving_image": torch.rand(1, 9, 14, 30)})
    data["ddf"] = torch.zeros(3, 8, 8, 8)
    with pytest.raises(ValueError, match="moving_image_original_shape"):
        RestoreDDFd()(data)
    assert RestoreDDFd(moving_key=None)(data)["ddf"].shape == (3, 12, 10, 8)


def test_resize_ddf_array_transform():
    ddf = MetaTensor(torch.ones(3, *NETWORK), affine=_affine())
    out = ResizeDDF(ORIGINAL)(ddf)
    factor = [(o - 1) / (n - 1) for o, n in zip(ORIGINAL, NETWORK)]
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(factor))
    last_new = _voxel_to_world(out.affine, [o - 1 for o in ORIGINAL])
    torch.testing.assert_close(last_new, _voxel_to_world(_affine(), [n - 1 for n in NETWORK]))


def _smooth_field(generator: torch.Generator, shape=ORIGINAL, amplitude: float = 3.0) -> torch.Tensor:
    coarse = (torch.rand(1, 3, 3, 3, 3, generator=generator) * 2 - 1) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


@pytest.mark.parametrize("method", ["onehot", "nearest"])
def test_warped_labels_hold_only_original_values(generator, method):
    data = _pair(generator, meta=True)
    data["ddf"] = _smooth_field(generator)
    out = WarpLabeld(method=method)(data)["warped_label"]
    assert out.dtype == torch.int16 and out.shape == (1, *ORIGINAL)
    assert set(out.unique().tolist()) <= set(LABEL_VALUES)
    assert not torch.equal(out.as_tensor(), data["moving_label"].as_tensor())  # it did move
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "fixed_image.nii.gz"


def test_warp_with_zero_field_is_identity_and_float_labels_keep_dtype(generator):
    data = _pair(generator)
    data["moving_label"] = data["moving_label"].float()
    data["ddf"] = torch.zeros(3, *ORIGINAL)
    out = WarpImaged()(WarpLabeld()(data))
    torch.testing.assert_close(out["warped_image"], data["moving_image"])
    assert out["warped_label"].dtype == torch.float32
    torch.testing.assert_close(out["warped_label"], data["moving_label"])


def test_warp_image_follows_the_warp_convention(generator):
    data = _pair(generator)
    data["ddf"] = torch.zeros(3, *ORIGINAL)
    data["ddf"][0] = 2.0
    out = WarpImaged(ref_key=None)(data)["warped_image"]
    torch.testing.assert_close(out[:, :-2], data["moving_image"][:, 2:])  # warped(x) = moving(x + ddf(x))


def test_resize_restore_warp_chain_on_shared_pair(shared_data):
    root = shared_data / "BrainSynth"
    data = {
        "fixed_image": str(root / "imagesTr" / "BrainSynth_0001_0000.nii.gz"),
        "moving_image": str(root / "imagesTr" / "BrainSynth_0002_0000.nii.gz"),
        "fixed_label": str(root / "labelsTr" / "BrainSynth_0001_0000.nii.gz"),
        "moving_label": str(root / "labelsTr" / "BrainSynth_0002_0000.nii.gz"),
    }
    keys = tuple(data)
    full = ("fixed_image_full", "moving_image_full", "fixed_label_full", "moving_label_full")
    pre = Compose(
        [
            LoadImaged(keys, ensure_channel_first=True),
            MRIPercentiled(("fixed_image", "moving_image")),
            CheckPaird(),
            CopyItemsd(keys, names=full),
            ResizePaird(32),
        ]
    )
    out = pre(data)
    assert out["fixed_image"].shape == (1, 32, 32, 32) and out["fixed_label"].shape == (1, 32, 32, 32)
    assert out["fixed_image_original_shape"].tolist() == [80, 96, 96]
    assert set(out["moving_label"].unique().tolist()) <= set(out["moving_label_full"].unique().tolist())
    out["ddf"] = torch.zeros(3, 32, 32, 32)
    post = Compose(
        [
            RestoreDDFd("ddf"),
            WarpImaged("moving_image_full", ref_key="fixed_image_full"),
            WarpLabeld("moving_label_full", ref_key="fixed_label_full", method="nearest"),  # onehot: 52 labels, slow
        ]
    )
    result = post(out)
    assert result["ddf"].shape == (3, 80, 96, 96)
    torch.testing.assert_close(result["ddf"].affine, out["fixed_image_full"].affine)
    torch.testing.assert_close(result["warped_label"].as_tensor(), out["moving_label_full"].as_tensor())
    torch.testing.assert_close(result["warped_image"].affine, out["fixed_image_full"].affine)


def test_bad_rank_is_rejected(generator):
    data = _pair(generator)
    data["fixed_image"] = data["fixed_image"][None]
    with pytest.raises(ValueError, match="fixed_image.*channel-first"):
        CheckPaird()(data)
    with pytest.raises(ValueError, match="fixed_image"):
        ResizePaird(8)(data)


def test_mismatched_pair_shapes_are_rejected(generator):
    data = _pair(generator)
    data["moving_image"] = torch.rand(1, 20, 17, 13)
    with pytest.raises(ValueError, match="fixed_image.*moving_image"):
        CheckPaird()(data)
    data = _pair(generator)
    data["moving_label"] = data["moving_label"][:, :-1]
    with pytest.raises(ValueError, match="moving_image.*moving_label"):
        ResizePaird(8)(data)
    data = _pair(generator)
    data["ddf"] = torch.zeros(3, *NETWORK)
    with pytest.raises(ValueError, match="moving_image.*ddf"):
        WarpImaged()(data)


def test_nan_and_bad_labels_are_rejected(generator):
    data = _pair(generator)
    data["moving_image"][0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="moving_image.*NaN"):
        ResizePaird(8)(data)
    data = _pair(generator)
    data["fixed_label"] = data["fixed_label"].float() + 0.5
    with pytest.raises(ValueError, match="fixed_label.*integer"):
        CheckPaird()(data)
    data = _pair(generator)
    data["ddf"] = torch.zeros(2, *ORIGINAL)
    with pytest.raises(ValueError, match="ddf"):
        WarpLabeld()(data)


@pytest.mark.parametrize("spatial_size", [0, 1, (8, 8), (8, 8, 1), 8.5, (8, 8, True)])
def test_bad_spatial_size(spatial_size):
    with pytest.raises(ValueError, match="spatial_size"):
        ResizePaird(spatial_size)


def test_bad_options():
    with pytest.raises(ValueError, match="method"):
        WarpLabeld(method="linear")
    with pytest.raises(ValueError, match="mode"):
        WarpImaged(mode="bicubic")
    with pytest.raises(ValueError, match="padding_mode"):
        WarpImaged(padding_mode="constant")
    with pytest.raises(ValueError, match="output_keys"):
        WarpImaged(keys=("a", "b"), output_keys="c")
    with pytest.raises(ValueError, match="label_keys"):
        ResizePaird(8, label_keys=("fixed_label",))


def test_missing_keys(generator):
    data = _pair(generator)
    del data["fixed_label"], data["moving_label"]
    assert "fixed_label" not in ResizePaird(8)(data)  # labels are optional
    del data["moving_image"]
    with pytest.raises(KeyError):
        ResizePaird(8)(data)
    assert ResizePaird(8, allow_missing_keys=True)(data)["fixed_image"].shape == (1, 8, 8, 8)


def test_singleton_axes_cannot_be_resized_on_corner_aligned_grids():
    with pytest.raises(ValueError, match="fixed_image.*>= 2 voxels"):
        ResizePaird(8)({"fixed_image": torch.rand(1, 12, 1, 8), "moving_image": torch.rand(1, 12, 10, 8)})
    with pytest.raises(ValueError, match="ddf.*>= 2 voxels"):
        ResizeDDF(8)(torch.zeros(3, 1, 4, 4))
