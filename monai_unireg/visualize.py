"""Registration overview pictures: image slices with label contours, a deformation grid and a log-Jacobian map."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import nibabel.orientations as nibo
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_unireg.io import atomic_path
from monai_unireg.validation import check_affine, check_spacing

__all__ = ["save_overview", "ras_view", "PLANES"]

#: The three planes of the overview, each with the axis of the RAS-reoriented volume it cuts across.
PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))
#: Anatomical letters at the low and high end of each RAS axis.
AXIS_ENDS = (("L", "R"), ("P", "A"), ("I", "S"))
GRID_STEP = 4
_IDENTITY_ORIENTATION = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
#: Label contour colours, ``[20, 3]`` RGB: matplotlib's tab20, its ten saturated colours (tab10) first.
LABEL_COLOURS = np.array(
    [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
     (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
     (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141),
     (158, 218, 229)],
    dtype=np.uint8,
)  # fmt: skip
#: The log-Jacobian colour map, ``[11, 3]`` RGB anchors from low (blue) through white to high (red): ColorBrewer's
#: RdBu reversed, as matplotlib's ``RdBu_r``; linear in between.
DIVERGING = np.array(
    [(5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
     (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31)],
    dtype=np.float64,
)  # fmt: skip
GRID_COLOUR = (31, 119, 180)
LETTER_COLOUR = (255, 255, 0)
FRAME_COLOUR = (128, 128, 128)
#: Layout in pixels: the widest panel's width, the tallest panel's most height, margins and font sizes.
PANEL_WIDTH, PANEL_HEIGHT = 240, 320
MARGIN, COLUMN_GAP, ROW_GAP = 12, 24, 14
BAR_GAP, BAR_WIDTH, BAR_SPACE = 6, 12, 64
TITLE_SIZE, PANEL_TITLE_SIZE, LETTER_SIZE, BAR_TEXT_SIZE = 16, 13, 12, 11
PANEL_TITLE_HEIGHT = PANEL_TITLE_SIZE + 6
#: zlib level of the PNG: 1 writes it several times faster than the default 6, for a somewhat larger file.
PNG_COMPRESSION = 1
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _as_volume(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``[X, Y, Z]`` (or with singleton batch/channel axes) -> numpy ``[X, Y, Z]``."""
    volume = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    volume = volume.reshape(volume.shape[-3:]) if volume.ndim > 3 and np.prod(volume.shape[:-3]) == 1 else volume
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume [X, Y, Z], got shape {volume.shape}.")
    return volume


def _orientation(affine: np.ndarray | torch.Tensor | None) -> np.ndarray:
    """nibabel orientation transform from the array axes to RAS (the nearest axes of an oblique affine)."""
    if affine is None:
        return _IDENTITY_ORIENTATION
    matrix = check_affine(affine).numpy()
    return nibo.ornt_transform(nibo.io_orientation(matrix), nibo.axcodes2ornt("RAS"))


def ras_view(
    volume: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor | None
) -> tuple[np.ndarray, tuple[float, ...]]:
    """``volume [X, Y, Z]`` reoriented so its axes run left->Right, posterior->Anterior, inferior->Superior (the
    axes of the ``affine`` nearest to them; only flips and axis permutations, no resampling), and its voxel size in
    mm along those axes. ``affine=None``: the array as it is, unit voxels."""
    array = _as_volume(volume, "volume")
    transform = _orientation(affine)
    if affine is None:
        return array, (1.0, 1.0, 1.0)
    matrix = check_affine(affine).numpy() @ nibo.inv_ornt_aff(transform, array.shape)
    return nibo.apply_orientation(array, transform), tuple(float(v) for v in np.linalg.norm(matrix[:3, :3], axis=0))


class _RasField:
    """A ``[3, X, Y, Z]`` voxel field seen on the RAS-reoriented grid without copying it: component ``i`` becomes
    component ``transform[i, 0]``, negated where that axis is flipped; only the slices drawn are materialised."""

    def __init__(self, field: np.ndarray, transform: np.ndarray) -> None:
        self.components: list[np.ndarray] = [field[0]] * 3
        self.signs = [1.0] * 3
        for axis, (new_axis, flip) in enumerate(transform):
            self.components[int(new_axis)] = nibo.apply_orientation(field[axis], transform)  # flips/transposes: views
            self.signs[int(new_axis)] = float(flip)
        self.shape = self.components[0].shape

    def slab(self, axis: int, low: int, high: int) -> np.ndarray:
        """``[3, ...]`` float64 displacements of the slices ``low:high`` across ``axis``."""
        index = tuple(slice(low, high) if a == axis else slice(None) for a in range(3))
        return np.stack([sign * np.asarray(c[index], np.float64) for c, sign in zip(self.components, self.signs)])


def _jacobian_determinant(field: np.ndarray) -> np.ndarray:
    """:func:`monai_unireg.spatial.jacobian_determinant` of one small ``[3, X, Y, Z]`` slab in numpy (the same
    ``torch.gradient`` differences, tested equal): for a few slices torch's thread start-up costs more than the maths,
    badly so on a busy machine."""
    gradients = np.gradient(field, axis=(1, 2, 3))  # gradients[d][i] = d u_i / d x_d
    j = [[gradients[d][i] + (1.0 if i == d else 0.0) for d in range(3)] for i in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def _central_log_jacobian(field: _RasField, axis: int) -> np.ndarray:
    """log |J| of the central slice across ``axis`` (NaN where the map folds), from a 3-slice slab: the same
    central differences as over the whole volume, at a fraction of its cost."""
    size = field.shape[axis]
    centre = size // 2
    low, high = max(centre - 1, 0), min(centre + 2, size)
    central = np.take(_jacobian_determinant(field.slab(axis, low, high)), centre - low, axis=axis)
    return np.where(central > 0, np.log(np.clip(central, 1e-9, None)), np.nan)


@lru_cache(maxsize=None)
def _font(size: int) -> _Font:
    """Pillow's built-in font at ``size`` pixels; its fixed-size bitmap font where Pillow lacks FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except ImportError:
        return ImageFont.load_default()


def _plane_axes(axis: int) -> tuple[int, int]:
    """The volume axes running right (horizontal) and up (vertical) in a panel cutting across ``axis``."""
    horizontal, vertical = (a for a in range(3) if a != axis)
    return horizontal, vertical


def _plane_mm(shape: Sequence[int], spacing: Sequence[float], axis: int) -> tuple[float, float]:
    """Width and height in mm of the slice across ``axis`` of a volume of ``shape`` (voxel ``spacing`` in mm)."""
    horizontal, vertical = _plane_axes(axis)
    return shape[horizontal] * spacing[horizontal], shape[vertical] * spacing[vertical]


def _pixel_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The mm covered by one square picture pixel: the widest panel :data:`PANEL_WIDTH` pixels wide, the tallest at
    most :data:`PANEL_HEIGHT` high."""
    sizes = [_plane_mm(shape, spacing, axis) for _, axis in PLANES]
    return max(max(w for w, _ in sizes) / PANEL_WIDTH, max(h for _, h in sizes) / PANEL_HEIGHT)


def _panel_size(shape: Sequence[int], spacing: Sequence[float], axis: int, pixel_mm: float) -> tuple[int, int]:
    """``(width, height)`` in pixels of the panel cutting across ``axis``: true proportions, ``pixel_mm`` per pixel."""
    return tuple(max(1, round(extent / pixel_mm)) for extent in _plane_mm(shape, spacing, axis))


def _nearest(count: int, voxel_mm: float, pixels: int, pixel_mm: float) -> np.ndarray:
    """``[pixels]`` index of the voxel (of ``count``) under each pixel's centre along one axis."""
    centres = (np.arange(pixels) + 0.5) * pixel_mm / voxel_mm
    return np.clip(centres.astype(np.int64), 0, count - 1)


def _central(volume: np.ndarray, axis: int) -> np.ndarray:
    """``[H, V]`` central slice across ``axis`` of ``volume [X, Y, Z]`` (H runs right, V up in the panel): a view
    (``np.take`` would first copy a whole flipped or transposed volume)."""
    return volume[(slice(None),) * axis + (volume.shape[axis] // 2,)]


def _to_pixels(plane: np.ndarray, spacing: Sequence[float], size: tuple[int, int], pixel_mm: float) -> np.ndarray:
    """``plane [H, V]`` with voxel ``spacing`` (mm, along H and V) -> ``[height, width]`` picture rows (top row first,
    i.e. the highest V) by nearest neighbour on the ``size = (width, height)`` square-``pixel_mm`` grid."""
    columns = _nearest(plane.shape[0], spacing[0], size[0], pixel_mm)
    rows = _nearest(plane.shape[1], spacing[1], size[1], pixel_mm)[::-1]
    return plane[columns[None, :], rows[:, None]]


def _grey(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``plane [H, V]`` -> ``[height, width, 3]`` uint8 grey, bilinear onto ``size = (width, height)`` pixels, the
    slice's own minimum black and maximum white."""
    values = np.nan_to_num(np.asarray(plane, np.float32))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(values.T[::-1])).resize(size, Image.Resampling.BILINEAR))
    low, high = float(values.min()), float(values.max())
    scaled = (resized - low) * (255.0 / (high - low)) if high > low else np.zeros_like(resized)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw_contours(rgb: np.ndarray, labels: np.ndarray) -> None:
    """Colour, in place in ``rgb [height, width, 3]``, the boundary pixels of every nonzero region of ``labels
    [height, width]`` (a pixel whose label differs from one of its 4 neighbours), label ``v`` in
    ``LABEL_COLOURS[(v - 1) % 20]``."""
    padded = np.pad(labels, 1, mode="edge")  # the panel's edge is no boundary
    boundary = np.zeros(labels.shape, bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        boundary |= neighbour != labels
    boundary &= labels != 0
    rgb[boundary] = LABEL_COLOURS[(labels[boundary] - 1) % len(LABEL_COLOURS)]


def _image_panel(
    volume: np.ndarray, labels: np.ndarray | None, axis: int, spacing: Sequence[float], pixel_mm: float
) -> Image.Image:
    """The grey central slice across ``axis`` of ``volume [X, Y, Z]``, with the contours of ``labels [X, Y, Z]``."""
    horizontal, vertical = _plane_axes(axis)
    plane_spacing = (spacing[horizontal], spacing[vertical])
    size = _panel_size(volume.shape, spacing, axis, pixel_mm)
    rgb = _grey(_central(volume, axis), size)
    if labels is not None:
        label_pixels = _to_pixels(_central(labels, axis), plane_spacing, size, pixel_mm)
        _draw_contours(rgb, np.rint(label_pixels).astype(np.int64))
    return Image.fromarray(rgb)


def _grid_panel(field: _RasField, axis: int, spacing: Sequence[float], pixel_mm: float) -> Image.Image:
    """Deformed grid lines ``x + u(x)`` every :data:`GRID_STEP` voxels of the central slice across ``axis`` (in-plane
    components, mm), on white."""
    horizontal, vertical = _plane_axes(axis)
    size = _panel_size(field.shape, spacing, axis, pixel_mm)
    index = field.shape[axis] // 2
    central = np.take(field.slab(axis, index, index + 1), 0, axis=1 + axis)  # [3, H, V]
    grid = np.meshgrid(np.arange(field.shape[horizontal]), np.arange(field.shape[vertical]), indexing="ij")
    x = (grid[0] + 0.5 + central[horizontal]) * (spacing[horizontal] / pixel_mm)
    y = size[1] - (grid[1] + 0.5 + central[vertical]) * (spacing[vertical] / pixel_mm)
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    lines = [np.stack([x[i], y[i]], axis=1) for i in range(0, x.shape[0], GRID_STEP)]
    lines += [np.stack([x[:, j], y[:, j]], axis=1) for j in range(0, x.shape[1], GRID_STEP)]
    for line in lines:
        draw.line(line.ravel().tolist(), fill=GRID_COLOUR, width=1)
    return panel


def _diverging(values: np.ndarray, limit: float) -> np.ndarray:
    """``values [...]`` -> ``[..., 3]`` uint8 colours of :data:`DIVERGING` over ``-limit..limit``; NaN black."""
    position = np.clip((np.nan_to_num(values) + limit) / (2 * limit), 0.0, 1.0) * (len(DIVERGING) - 1)
    anchors = np.arange(len(DIVERGING))
    rgb = np.stack([np.interp(position, anchors, DIVERGING[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(values)] = 0
    return np.rint(rgb).astype(np.uint8)


def _log_jacobian_panel(
    log_jacobian: np.ndarray, shape: Sequence[int], axis: int, spacing: Sequence[float], pixel_mm: float
) -> tuple[Image.Image, float]:
    """``log_jacobian [H, V]`` (:func:`_central_log_jacobian` across ``axis`` of a volume of ``shape``) as a panel,
    and its symmetric colour limit: the largest ``|log J|``, at least 1e-3."""
    finite = np.abs(log_jacobian[np.isfinite(log_jacobian)])
    limit = max(float(finite.max()) if finite.size else 0.0, 1e-3)
    horizontal, vertical = _plane_axes(axis)
    size = _panel_size(shape, spacing, axis, pixel_mm)
    pixels = _to_pixels(log_jacobian, (spacing[horizontal], spacing[vertical]), size, pixel_mm)
    return Image.fromarray(_diverging(pixels, limit)), limit


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: _Font, anchor: str, **style) -> None:
    """``text`` (lines centred) placed by its ink box: ``anchor`` is two letters, ``l``/``m``/``r`` (the box's left,
    middle or right at ``xy[0]``) and ``t``/``m``/``b`` (its top, middle or bottom at ``xy[1]``); unlike Pillow's own
    anchors this works for bitmap fonts too. ``style``: :meth:`ImageDraw.ImageDraw.multiline_text`'s options."""
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    dx = {"l": -left, "m": -(left + right) / 2, "r": -right}[anchor[0]]
    dy = {"t": -top, "m": -(top + bottom) / 2, "b": -bottom}[anchor[1]]
    draw.multiline_text((xy[0] + dx, xy[1] + dy), text, font=font, align="center", **style)


def _mark_ends(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], axis: int) -> None:
    """The anatomical letters (L/R, P/A, I/S) at the edges of the panel at ``box = (left, top, width, height)``."""
    horizontal, vertical = _plane_axes(axis)
    left, top, width, height = box
    pad = 3
    places = (
        ((left + pad, top + height / 2), AXIS_ENDS[horizontal][0], "lm"),
        ((left + width - pad, top + height / 2), AXIS_ENDS[horizontal][1], "rm"),
        ((left + width / 2, top + height - pad), AXIS_ENDS[vertical][0], "mb"),
        ((left + width / 2, top + pad), AXIS_ENDS[vertical][1], "mt"),
    )
    font = _font(LETTER_SIZE)
    stroke = 1 if isinstance(font, ImageFont.FreeTypeFont) else 0
    for xy, letter, anchor in places:
        _text(draw, xy, letter, font, anchor, fill=LETTER_COLOUR, stroke_width=stroke, stroke_fill="black")


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], limit: float) -> None:
    """A vertical bar of :data:`DIVERGING` right of the panel at ``box = (left, top, width, height)``, ``+limit`` at
    the top, ``-limit`` at the bottom, labelled."""
    left, top, width, height = box
    x = left + width + BAR_GAP
    values = np.linspace(limit, -limit, height)
    bar = np.repeat(_diverging(values, limit)[:, None, :], BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(bar), (x, top))
    draw.rectangle((x - 1, top - 1, x + BAR_WIDTH, top + height), outline=FRAME_COLOUR)
    font = _font(BAR_TEXT_SIZE)
    x_text = x + BAR_WIDTH + 4
    _text(draw, (x_text, top), f"+{limit:.3g}", font, "lt", fill="black")
    _text(draw, (x_text, top + height / 2), "0", font, "lm", fill="black")
    _text(draw, (x_text, top + height), f"-{limit:.3g}", font, "lb", fill="black")


def _title_height(title: str | None) -> int:
    """Pixels from the top of the picture to its first row of panels: the margin and the ``title``'s lines."""
    if not title:
        return MARGIN
    _, top, _, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox(
        (0, 0), title, font=_font(TITLE_SIZE), align="center"
    )
    return MARGIN + int(np.ceil(bottom - top)) + ROW_GAP


def _new_canvas(sizes: Sequence[tuple[int, int]], title: str | None) -> tuple[Image.Image, int]:
    """A white picture for one row of panels per ``(width, height)`` of ``sizes``, the ``title`` on top, and the
    height of its first row. Each column is as wide as the widest panel; the last has a colour bar beside it."""
    top = _title_height(title)
    width = 2 * MARGIN + 5 * max(w for w, _ in sizes) + 4 * COLUMN_GAP + BAR_SPACE
    height = top + sum(PANEL_TITLE_HEIGHT + h + ROW_GAP for _, h in sizes) - ROW_GAP + MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    if title:
        _text(ImageDraw.Draw(canvas), (width / 2, MARGIN), title, _font(TITLE_SIZE), "mt", fill="black")
    return canvas, top


def _draw_row(
    canvas: Image.Image,
    panels: Sequence[Image.Image],
    titles: Sequence[str],
    top: int,
    column_width: int,
    ends_of: int | None,
) -> tuple[int, int, int, int]:
    """Paste the row's ``panels`` (all of one size) at ``top``, centred in columns of ``column_width``, each framed
    under its title, with the anatomical letters of the plane across axis ``ends_of`` (none if None); returns the
    last panel's ``(left, top, width, height)``."""
    draw = ImageDraw.Draw(canvas)
    width, height = panels[0].size
    for column, (panel, title) in enumerate(zip(panels, titles)):
        left = MARGIN + column * (column_width + COLUMN_GAP) + (column_width - width) // 2
        box = (left, top + PANEL_TITLE_HEIGHT, width, height)
        canvas.paste(panel, box[:2])
        draw.rectangle((left - 1, box[1] - 1, left + width, box[1] + height), outline=FRAME_COLOUR)
        _text(draw, (left + width / 2, box[1] - 4), title, _font(PANEL_TITLE_SIZE), "mb", fill="black")
        if ends_of is not None:
            _mark_ends(draw, box, ends_of)
    return box


def _draw(
    shown: Sequence[tuple[np.ndarray, np.ndarray | None]],
    field: _RasField,
    spacing: Sequence[float],
    anatomical: bool,
    title: str | None,
) -> Image.Image:
    """The overview of the fixed, moving and warped ``[X, Y, Z]`` volumes of ``shown``, each with its ``[X, Y, Z]``
    labels to outline (or None), and the ``field``, all with voxel ``spacing`` mm; ``anatomical``: RAS volumes."""
    shape = shown[0][0].shape
    pixel_mm = _pixel_mm(shape, spacing)
    sizes = [_panel_size(shape, spacing, axis, pixel_mm) for _, axis in PLANES]
    canvas, top = _new_canvas(sizes, title)
    for (plane, axis), (_, height) in zip(PLANES, sizes):
        plane_name = plane if anatomical else f"across array axis {axis}"
        extent = _plane_mm(shape, spacing, axis)
        titles = (f"fixed ({plane_name}, {extent[0]:.0f} x {extent[1]:.0f} mm)", "moving", "warped (fixed contours)",
                  "deformation grid", "log |J| (folding: black)")  # fmt: skip
        log_jacobian, limit = _log_jacobian_panel(_central_log_jacobian(field, axis), shape, axis, spacing, pixel_mm)
        panels = [_image_panel(volume, contours, axis, spacing, pixel_mm) for volume, contours in shown]
        panels += [_grid_panel(field, axis, spacing, pixel_mm), log_jacobian]
        box = _draw_row(canvas, panels, titles, top, max(w for w, _ in sizes), axis if anatomical else None)
        _colour_bar(canvas, ImageDraw.Draw(canvas), box, limit)
        top += PANEL_TITLE_HEIGHT + height + ROW_GAP
    return canvas


def save_overview(
    path: str | os.PathLike,
    fixed: np.ndarray | torch.Tensor,
    moving: np.ndarray | torch.Tensor,
    warped: np.ndarray | torch.Tensor,
    ddf: np.ndarray | torch.Tensor,
    *,
    fixed_label: np.ndarray | torch.Tensor | None = None,
    moving_label: np.ndarray | torch.Tensor | None = None,
    warped_label: np.ndarray | torch.Tensor | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG: for three central orthogonal slices, fixed / moving / warped images with label contours
    (fixed contours drawn over the warped image too, to judge alignment), the deformed grid and the log-Jacobian
    determinant map (non-positive determinants, i.e. folding, shown black).

    With the fixed grid's ``affine`` the volumes are first reoriented to RAS (:func:`ras_view`: flips and axis
    permutations only), so the rows are the sagittal, coronal and axial planes, the right way up, with the patient's
    right on the right of each panel (neurological convention) and L/R, P/A, I/S marked at the edges; a scan stored
    LIA (FreeSurfer) and the same scan stored RAS give the same picture. Without an ``affine`` nothing is known
    about anatomy: the rows are slices across array axes 0, 1 and 2, titled so.

    Every panel shows its slice in true proportions (square pixels of the same size in mm throughout, the picture
    about 1400 pixels wide); label ``v``'s contours are drawn in ``LABEL_COLOURS[(v - 1) % 20]``.

    Args:
        path: output ``.png`` (written atomically).
        fixed, moving, warped: ``[X, Y, Z]`` images on the fixed grid (moving may be on it after resampling).
        ddf: ``[3, X, Y, Z]`` displacement in voxels of the fixed grid.
        fixed_label, moving_label, warped_label: optional ``[X, Y, Z]`` integer label maps.
        spacing: voxel size in mm, for true proportions, when no ``affine`` is given.
        affine: ``[4, 4]`` voxel-to-RAS-mm affine of the fixed grid (its voxel sizes replace ``spacing``).
        title: figure title.

    Returns:
        the path written.
    """
    spacing = check_spacing(spacing)
    fixed_v, moving_v, warped_v = (
        _as_volume(v, n) for v, n in ((fixed, "fixed"), (moving, "moving"), (warped, "warped"))
    )
    field = ddf.detach().cpu() if isinstance(ddf, torch.Tensor) else torch.as_tensor(np.asarray(ddf))
    field = field.reshape(3, *field.shape[-3:]).to(torch.float32)
    if field.shape[1:] != fixed_v.shape:
        raise ValueError(f"ddf must have shape [3, {', '.join(map(str, fixed_v.shape))}], got {tuple(field.shape)}.")
    for name, volume in (("moving", moving_v), ("warped", warped_v)):
        if volume.shape != fixed_v.shape:
            raise ValueError(f"{name} must lie on the fixed grid {fixed_v.shape}, got shape {volume.shape}.")
    given = {"fixed_label": fixed_label, "moving_label": moving_label, "warped_label": warped_label}
    labels = {name: None if value is None else _as_volume(value, name) for name, value in given.items()}
    transform = _orientation(affine)
    if affine is not None:
        fixed_v, spacing = ras_view(fixed_v, affine)
        moving_v, warped_v = (ras_view(v, affine)[0] for v in (moving_v, warped_v))
        labels = {name: None if value is None else ras_view(value, affine)[0] for name, value in labels.items()}
    field_np = _RasField(field.numpy(), transform)
    warped_contours = labels["fixed_label"] if labels["fixed_label"] is not None else labels["warped_label"]
    shown = ((fixed_v, labels["fixed_label"]), (moving_v, labels["moving_label"]), (warped_v, warped_contours))
    canvas = _draw(shown, field_np, spacing, affine is not None, title)
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="png", compress_level=PNG_COMPRESSION)
    return Path(path)
