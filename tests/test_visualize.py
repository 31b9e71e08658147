"""Overview pictures: a readable PNG is written atomically; bad shapes are refused; the panels show anatomy the right
way round in true proportions, label contours in their colours and folding in black; no matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from scipy import ndimage

from monai_unireg import visualize
from monai_unireg.visualize import LABEL_COLOURS, save_overview


def picture(path) -> np.ndarray:
    """``[height, width, 3]`` uint8 pixels of a PNG."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def black_regions(pixels: np.ndarray, min_area: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, bottom, right)`` boxes (exclusive ends) of the pure black 8-connected regions of at least
    ``min_area`` pixels, top to bottom, then left to right (rows of panels: at most a few pixels apart in top)."""
    regions, _ = ndimage.label((pixels == 0).all(axis=2), structure=np.ones((3, 3)))
    areas = np.bincount(regions.ravel())
    boxes = []
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        if areas[index] >= min_area:
            boxes.append((box[0].start, box[1].start, box[0].stop, box[1].stop))
    return sorted(boxes, key=lambda b: (b[0] // 20, b[1]))


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


def test_visualize_imports_no_matplotlib():
    code = "import sys, monai_unireg.visualize; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_right_anterior_superior_octant_is_top_right_in_every_image_panel_in_true_proportions(tmp_path):
    """Stored LIA (1.5 x 1 x 2 mm voxels in RAS): each of the nine image panels (black background) shows the bright
    octant in its top-right quadrant (sagittal: anterior right, superior up; coronal: right right, superior up;
    axial: right right, anterior up), and its width : height is the plane's in mm."""
    shape = (20, 24, 28)
    image = np.zeros(shape, np.float32)
    image[10:18, 12:22, 14:26] = 1.0  # from the centre voxel towards right, anterior, superior
    lia_image, lia_affine = lia_copy(image, np.diag([1.5, 1.0, 2.0, 1.0]))
    save_overview(tmp_path / "o.png", lia_image, lia_image, lia_image, np.zeros((3, *lia_image.shape)),
                  affine=lia_affine)  # fmt: skip
    pixels = picture(tmp_path / "o.png")
    boxes = black_regions(pixels, min_area=5000)
    assert len(boxes) == 9
    planes_mm = [(24 * 1.0, 28 * 2.0), (20 * 1.5, 28 * 2.0), (20 * 1.5, 24 * 1.0)]  # sagittal, coronal, axial
    for index, (top, left, bottom, right) in enumerate(boxes):
        width, height = right - left, bottom - top
        width_mm, height_mm = planes_mm[index // 3]
        assert abs(width / height - width_mm / height_mm) < 0.02, (index, width, height)
        panel = pixels[top:bottom, left:right].astype(int)
        bright = (panel.min(axis=2) > 200) & (panel.max(axis=2) == panel.min(axis=2))
        rows, columns = np.nonzero(bright)
        assert rows.size > 0.1 * width * height / 4, index
        assert rows.max() <= height / 2 + 2 and columns.min() >= width / 2 - 2, index
        assert rows.min() >= 1 and columns.max() <= width - 2, index  # the octant stops short of the panel's edges


def test_folding_is_black_in_the_log_jacobian_panels_only(tmp_path):
    """A box pushed 4 voxels along axis 0 folds at its faces across that axis: black bands in the log |J| panels of
    the two planes that cut those faces (the rightmost column); without folding no black appears there."""
    image, labels = phantom()
    folded = np.zeros((3, *image.shape))
    folded[0, 5:15, 5:15, 5:15] = -4.0
    for name, ddf in (("smooth", np.zeros_like(folded)), ("folded", folded)):
        save_overview(tmp_path / f"{name}.png", image, image, image, ddf, fixed_label=labels, spacing=(2, 1, 1.5))
    width = picture(tmp_path / "smooth.png").shape[1]
    rightmost = {name: [b for b in black_regions(picture(tmp_path / f"{name}.png"), 200) if b[1] > 0.75 * width]
                 for name in ("smooth", "folded")}  # fmt: skip
    assert rightmost["smooth"] == []
    assert len(rightmost["folded"]) == 2  # one band in the coronal and one in the axial log |J| panel
    for top, left, bottom, right in rightmost["folded"]:
        assert bottom - top > 2 * (right - left)  # the fold is a plane across axis 0: a band along the other axis


def test_contours_are_drawn_in_each_labels_colour(tmp_path):
    """Label 3 and 5 boundaries appear in LABEL_COLOURS[2] and [4] on the fixed and warped panels (the warped one
    shows the fixed contours), as outlines; another label's colour and any contour without labels do not appear."""
    image, labels = phantom()
    relabelled = np.select([labels == 1, labels == 2], [3, 5], 0)
    ddf = np.zeros((3, *image.shape))
    save_overview(tmp_path / "labels.png", image, image, image, ddf, fixed_label=relabelled)
    save_overview(tmp_path / "none.png", image, image, image, ddf)
    with_labels, without = picture(tmp_path / "labels.png"), picture(tmp_path / "none.png")
    width = with_labels.shape[1]

    def columns_of(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
        return np.nonzero((pixels == colour).all(axis=2))[1]

    for colour in (LABEL_COLOURS[2], LABEL_COLOURS[4]):
        columns = columns_of(with_labels, colour)
        assert columns.size > 100 and columns.max() < 0.6 * width  # image panels only
        assert (columns < 0.2 * width).any() and (columns > 0.4 * width).any()  # fixed and warped panels
        assert not ((columns > 0.2 * width) & (columns < 0.4 * width)).any()  # not the moving panel
        assert columns_of(without, colour).size == 0
        coloured = np.pad((with_labels == colour).all(axis=2), 1)  # outlines: a 4-neighbour of another colour
        inner = coloured[1:-1, :-2] & coloured[1:-1, 2:] & coloured[:-2, 1:-1] & coloured[2:, 1:-1]
        assert not (coloured[1:-1, 1:-1] & inner).any()
    assert columns_of(with_labels, LABEL_COLOURS[1]).size == 0


def test_without_freetype_the_bitmap_font_draws_the_text(tmp_path, monkeypatch):
    """Pillow without FreeType: ``load_default(size=...)`` raises ImportError, ``load_default()`` gives the bitmap
    font, which the picture is drawn with."""

    def no_freetype(size=None):
        if size is not None:
            raise ImportError("The _imagingft C module is not installed")
        return ImageFont.load_default_imagefont()

    image, labels = phantom()
    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    visualize._font.cache_clear()
    try:
        save_overview(tmp_path / "o.png", image, image, image, np.zeros((3, *image.shape)), fixed_label=labels,
                      affine=np.eye(4), title="bitmap")  # fmt: skip
        assert isinstance(visualize._font(13), ImageFont.ImageFont)
    finally:
        visualize._font.cache_clear()
    assert picture(tmp_path / "o.png").shape[1] > 1200
