"""Overview pictures: a readable PNG is written atomically; bad shapes are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_unireg.visualize import save_overview


def picture(path) -> np.ndarray:
    """``[height, width, 3]`` uint8 pixels of a PNG."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def phantom(shape=(20, 24, 28)):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0)
    radius = np.linalg.norm((grid - np.array(shape).reshape(3, 1, 1, 1) / 2) / 6, axis=0)
    labels = (radius < 1).astype(np.int16) + (radius < 0.5)
    return labels.astype(np.float32) / 2, labels


def test_overview_png_is_written(tmp_path):
    image, labels = phantom()
    ddf = torch.zeros(3, *image.shape)
    ddf[0, 5:15, 5:15, 5:15] = -4.0  # folds at the box faces
    path = save_overview(tmp_path / "overview.png", image, image, image, ddf, fixed_label=labels,
                         warped_label=labels, spacing=(2.0, 1.0, 1.5), title="test")  # fmt: skip
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_overview_refuses_mismatched_field(tmp_path):
    image, _ = phantom()
    with pytest.raises(ValueError, match="ddf"):
        save_overview(tmp_path / "o.png", image, image, image, torch.zeros(3, 5, 5, 5))
    with pytest.raises(ValueError, match="moving"):
        save_overview(tmp_path / "o.png", image, image[0], image, torch.zeros(3, *image.shape))
    with pytest.raises(ValueError, match="spacing"):
        save_overview(tmp_path / "o.png", image, image, image, torch.zeros(3, *image.shape), spacing=(1, 0, 1))
    assert not list(tmp_path.iterdir())


def lia_copy(volume: np.ndarray, ras_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored as FreeSurfer stores them (LIA: axes towards Left, Inferior, Anterior)."""
    shape = volume.shape
    # LIA index (i, j, k) <- RAS index (X-1-i, Z-1-k... ): i runs to the left, j downwards, k forwards
    lia = np.flip(volume, 0).transpose(0, 2, 1)[:, ::-1, :]
    to_ras_index = np.array(
        [[-1.0, 0, 0, shape[0] - 1], [0, 0, 1.0, 0], [0, -1.0, 0, shape[2] - 1], [0, 0, 0, 1]]
    )  # LIA index -> RAS index
    return np.ascontiguousarray(lia), ras_affine @ to_ras_index


def field_to_lia(ddf: np.ndarray) -> np.ndarray:
    """A RAS-grid voxel field ``[3, X, Y, Z]`` on the LIA grid of :func:`lia_copy` (components follow the axes)."""
    moved = [lia_copy(ddf[a], np.eye(4))[0] for a in range(3)]
    return np.stack([-moved[0], -moved[2], moved[1]])


def test_a_lia_scan_and_the_same_scan_in_ras_give_the_same_picture(tmp_path):
    """Anatomy, not array axes: FreeSurfer's LIA storage of a scan draws exactly the RAS storage's overview."""
    image, labels = phantom((20, 24, 28))
    image[14:18, 16:20, 20:24] = 1.0  # a bright marker right, anterior, superior
    ras_affine = np.diag([1.5, 1.0, 2.0, 1.0])
    ddf = np.random.default_rng(0).normal(0, 0.3, (3, 20, 24, 28))
    lia_image, lia_affine = lia_copy(image, ras_affine)
    lia_labels, _ = lia_copy(labels, ras_affine)
    assert lia_image.shape == (20, 28, 24)
    from monai_unireg.visualize import ras_view

    view, spacing = ras_view(lia_image, lia_affine)
    np.testing.assert_array_equal(view, image)
    assert spacing == (1.5, 1.0, 2.0)
    common = {"title": "orientation"}
    save_overview(tmp_path / "ras.png", image, image, image, ddf, fixed_label=labels, affine=ras_affine, **common)
    save_overview(
        tmp_path / "lia.png", lia_image, lia_image, lia_image, field_to_lia(ddf), fixed_label=lia_labels,
        affine=lia_affine, **common,
    )  # fmt: skip
    np.testing.assert_array_equal(picture(tmp_path / "lia.png"), picture(tmp_path / "ras.png"))
    save_overview(tmp_path / "raw.png", lia_image, lia_image, lia_image, field_to_lia(ddf), **common)
    assert not np.array_equal(picture(tmp_path / "raw.png"), picture(tmp_path / "ras.png"))


def test_ras_view_puts_the_marker_right_anterior_superior():
    """In the RAS view the axial slice has the patient's right on the right and anterior at the top."""
    from monai_unireg.visualize import ras_view

    image = np.zeros((10, 12, 14), np.float32)
    image[8, 9, 11] = 1.0  # right, anterior, superior in RAS index space
    lia, lia_affine = lia_copy(image, np.eye(4))
    assert lia[1, 14 - 1 - 11, 9] == 1.0  # stored near the start of the L axis and the I axis
    view, _ = ras_view(lia, lia_affine)
    assert np.unravel_index(np.argmax(view), view.shape) == (8, 9, 11)


def test_central_log_jacobian_of_a_slab_equals_the_whole_volume():
    from monai_unireg.spatial import jacobian_determinant
    from monai_unireg.visualize import _IDENTITY_ORIENTATION, _central_log_jacobian, _RasField

    field = np.random.default_rng(1).normal(0, 0.2, (3, 9, 10, 11))
    whole = jacobian_determinant(torch.from_numpy(field)[None])[0, 0].numpy()
    for axis in range(3):
        expected = np.log(np.take(whole, field.shape[1 + axis] // 2, axis=axis))
        np.testing.assert_allclose(
            _central_log_jacobian(_RasField(field, _IDENTITY_ORIENTATION), axis), expected, atol=1e-12
        )
