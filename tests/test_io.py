"""I/O: atomic writes and displacement fields that ITK reads with the intended geometry."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from monai_unireg import io, spatial
from monai_unireg.io import load_network, load_weights, remove_stale_temporaries, save_nifti


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 2.5])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    return affine


def test_ddf_round_trip_and_lps_millimetres(tmp_path, generator):
    ddf = torch.randn(1, 3, 6, 7, 8, generator=generator)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    path = io.save_ddf(ddf, affine, tmp_path / "ddf.nii.gz")
    loaded, loaded_affine = io.load_ddf(path)
    torch.testing.assert_close(loaded, ddf, atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded_affine, affine)
    vectors, _ = io.load_nifti(path)
    assert vectors.shape == (6, 7, 8, 1, 3)
    # one voxel along axis 0 at 2 mm (RAS +x) is -2 mm in LPS
    unit = torch.zeros(1, 3, 2, 2, 2)
    unit[:, 0] = 1.0
    io.save_ddf(unit, affine, tmp_path / "unit.nii.gz")
    np.testing.assert_allclose(io.load_nifti(tmp_path / "unit.nii.gz")[0][0, 0, 0, 0], [-2.0, 0.0, 0.0])


def test_atomic_path_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "out" / "result.nii.gz"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: io.load_nifti(p / "missing.nii.gz"), "does not exist"),
        (
            lambda p: io.load_nifti((p / "bad.nii.gz").write_bytes(b"garbage") and p / "bad.nii.gz"),
            "not a readable NIfTI",
        ),
        (lambda p: io.save_ddf(torch.zeros(2, 3, 4, 4, 4), np.eye(4), p / "d.nii.gz"), "single field"),
        (lambda p: io.save_ddf(torch.zeros(1, 2, 4, 4, 4), np.eye(4), p / "d.nii.gz"), "ddf"),
        (lambda p: io.save_ddf(torch.zeros(1, 3, 4, 4, 4), np.zeros((4, 4)), p / "d.nii.gz"), "affine"),
    ],
)
def test_bad_input(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)
    assert not list(tmp_path.glob("d.nii.gz"))


def test_itk_applies_the_saved_field_like_our_warp(tmp_path, generator):
    """SimpleITK resamples the moving image through the saved field exactly as spatial.warp does."""
    sitk = pytest.importorskip("SimpleITK")
    shape = (10, 12, 14)
    affine = oblique_affine()
    moving = torch.nn.functional.interpolate(
        torch.rand(1, 1, 4, 4, 4, generator=generator), size=shape, mode="trilinear"
    )
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3, generator=generator), size=shape, mode="trilinear")
    io.save_nifti(moving[0, 0], affine, tmp_path / "moving.nii.gz")
    io.save_ddf(ddf, affine, tmp_path / "ddf.nii.gz")

    moving_itk = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64)
    field_itk = sitk.ReadImage(str(tmp_path / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field_itk)
    warped_itk = sitk.Resample(moving_itk, moving_itk, transform, sitk.sitkLinear, 0.0)
    warped_itk = torch.from_numpy(sitk.GetArrayFromImage(warped_itk).transpose(2, 1, 0).copy())

    ours = spatial.warp(moving.double(), ddf.double(), padding_mode="zeros")[0, 0]
    coords = spatial.identity_grid(shape, dtype=torch.float64) + ddf[0].double()
    inside = ((coords >= 0) & (coords <= torch.tensor(shape).view(3, 1, 1, 1) - 1)).all(0)
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False
    torch.testing.assert_close(warped_itk[inside], ours[inside], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Weights files: one-line refusals naming the file, checkpoints that carry their method, files readable as the umask


class _NotAWeight:
    """A pickled object that weights-only loading must refuse (it could run code when unpickled)."""


def test_weights_files_refused_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(3)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotAWeight()}, pickled)
    text = tmp_path / "text.pt"
    text.write_text("weights")
    cases = {truncated: "truncated or corrupt", empty: "is empty", pickled: "refused without being run", text: "not a "}
    for path, expected in cases.items():
        with pytest.raises(ValueError, match=expected) as caught:
            load_weights(path, "--weights")
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and message.startswith("--weights")
        assert "weights_only=False" not in message and "trust" not in message
    assert torch.equal(load_weights(good)["model"]["w"], torch.ones(3))


def test_checkpoint_of_another_method_is_refused_by_name(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"method": "SACBNet", "config": {}, "model": {}}, path)
    with pytest.raises(ValueError, match="holds a SACBNet checkpoint, not PromptReg"):
        load_network(path, lambda config: torch.nn.Linear(1, 1), "PromptReg")
    torch.save({"config": {"channels": 3}, "model": {}}, path)  # no method tag: the config does not fit
    with pytest.raises(ValueError, match="not written for Linear"):
        load_network(path, lambda config: torch.nn.Linear(**config), "Linear")


def test_outputs_follow_the_umask_and_killed_temporaries_are_recognised(tmp_path):
    previous = os.umask(0o022)
    try:
        written = save_nifti(torch.zeros(4, 4, 4), np.eye(4), tmp_path / "a.nii.gz")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    stale = [tmp_path / ".ddf.nii.gz.x1y2.partial.nii.gz", tmp_path / ".partial-abc"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    kept = tmp_path / ".hidden"
    kept.write_text("user file")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert written.exists() and kept.exists() and not any(path.exists() for path in stale)


def test_ddf_gzip_is_stored_and_holds_what_nibabel_writes(tmp_path, generator):
    # ddf.nii.gz is written at gzip level 0 (a float field barely compresses; compressing took most of the writing):
    # still a gzip file, with the header and vectors nibabel's own compressed save gives
    import nibabel as nib

    ddf = torch.randn(1, 3, 6, 7, 8, generator=generator)
    affine = np.diag([2.0, -1.5, 1.0, 1.0])
    ours, plain = tmp_path / "ddf.nii.gz", tmp_path / "plain.nii"
    io.save_ddf(ddf, affine, ours)
    io.save_ddf(ddf, affine, plain)  # not .nii.gz: nibabel's save
    assert ours.read_bytes()[:2] == b"\x1f\x8b"
    assert ours.stat().st_size > 6 * 7 * 8 * 3 * 4  # stored, not deflated
    written, reference = nib.load(str(ours)), nib.load(str(plain))
    assert written.header.binaryblock == reference.header.binaryblock
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(reference.dataobj))
    torch.testing.assert_close(io.load_ddf(ours)[0], ddf, rtol=0, atol=1e-5)
