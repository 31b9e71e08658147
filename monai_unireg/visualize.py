"""Registration overview pictures: image slices with label contours, a deformation grid and a log-Jacobian map."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel.orientations as nibo  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from monai_unireg.io import atomic_path  # noqa: E402
from monai_unireg.validation import check_affine, check_spacing  # noqa: E402

__all__ = ["save_overview", "ras_view", "PLANES"]

#: The three planes of the overview, each with the axis of the RAS-reoriented volume it cuts across.
PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))
#: Anatomical letters at the low and high end of each RAS axis.
AXIS_ENDS = (("L", "R"), ("P", "A"), ("I", "S"))
GRID_STEP = 4
_IDENTITY_ORIENTATION = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


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


def _slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """Central slice across ``axis``, transposed so the first remaining axis runs left-right."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis).T


def _extent(shape: Sequence[int], spacing: Sequence[float], axis: int) -> tuple[float, float, float, float]:
    kept = [a for a in range(3) if a != axis]
    return (0.0, shape[kept[0]] * spacing[kept[0]], 0.0, shape[kept[1]] * spacing[kept[1]])


def _mark_ends(ax, axis: int, anatomical: bool) -> None:
    """The anatomical letters at the panel's edges (L/R, P/A, I/S)."""
    if not anatomical:
        return
    horizontal, vertical = (a for a in range(3) if a != axis)
    style = {"transform": ax.transAxes, "fontsize": 7, "color": "yellow"}
    ax.text(0.02, 0.5, AXIS_ENDS[horizontal][0], ha="left", va="center", **style)
    ax.text(0.98, 0.5, AXIS_ENDS[horizontal][1], ha="right", va="center", **style)
    ax.text(0.5, 0.02, AXIS_ENDS[vertical][0], ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, AXIS_ENDS[vertical][1], ha="center", va="top", **style)


def _show_image(ax, volume: np.ndarray, axis: int, spacing, labels: np.ndarray | None, title: str) -> None:
    extent = _extent(volume.shape, spacing, axis)
    ax.imshow(_slice(volume, axis), cmap="gray", origin="lower", extent=extent)
    if labels is not None:
        label_slice = _slice(labels, axis)
        values = [v for v in np.unique(label_slice) if v != 0]
        if values:
            ax.contour(label_slice, levels=np.asarray(values, dtype=float) - 0.5, origin="lower", extent=extent,
                       linewidths=0.6, cmap="tab20")  # fmt: skip
    ax.set_title(title, fontsize=8)


def _show_grid(ax, ddf: _RasField, axis: int, spacing) -> None:
    """Deformed grid lines ``x + u(x)`` of the central slice (in-plane components, mm)."""
    kept = [a for a in range(3) if a != axis]
    shape = ddf.shape
    index = shape[axis] // 2
    central = np.take(ddf.slab(axis, index, index + 1), 0, axis=1 + axis)
    u = [central[a] for a in kept]
    grid = np.meshgrid(np.arange(shape[kept[0]]), np.arange(shape[kept[1]]), indexing="ij")
    x = (grid[0] + u[0]) * spacing[kept[0]]
    y = (grid[1] + u[1]) * spacing[kept[1]]
    lines = [np.stack([x[i, :], y[i, :]], axis=1) for i in range(0, x.shape[0], GRID_STEP)]
    lines += [np.stack([x[:, j], y[:, j]], axis=1) for j in range(0, x.shape[1], GRID_STEP)]
    ax.add_collection(LineCollection(lines, colors="tab:blue", linewidths=0.5))  # one artist: fast to draw
    ax.set_xlim(*_extent(shape, spacing, axis)[:2])
    ax.set_ylim(*_extent(shape, spacing, axis)[2:])
    ax.set_aspect("equal")
    ax.set_title("deformation grid", fontsize=8)


def _show_log_jacobian(fig, ax, log_jacobian: np.ndarray, shape: Sequence[int], axis: int, spacing) -> None:
    """``log_jacobian``: central slice across ``axis`` of a volume of ``shape`` (see :func:`_central_log_jacobian`)."""
    finite = np.abs(log_jacobian[np.isfinite(log_jacobian)])
    limit = max(float(finite.max()) if finite.size else 0.0, 1e-3)
    shown = ax.imshow(log_jacobian.T, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower",
                      extent=_extent(shape, spacing, axis))  # fmt: skip
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title("log |J| (folding: black)", fontsize=8)


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

    fig, axes = plt.subplots(3, 5, figsize=(15, 9))
    for row, (plane, axis) in enumerate(PLANES):
        plane_name = plane if affine is not None else f"across array axis {axis}"
        extent = _extent(fixed_v.shape, spacing, axis)
        size = f"{extent[1]:.0f} x {extent[3]:.0f} mm"
        _show_image(axes[row, 0], fixed_v, axis, spacing, labels["fixed_label"], f"fixed ({plane_name}, {size})")
        _show_image(axes[row, 1], moving_v, axis, spacing, labels["moving_label"], "moving")
        warped_contours = labels["fixed_label"] if labels["fixed_label"] is not None else labels["warped_label"]
        _show_image(axes[row, 2], warped_v, axis, spacing, warped_contours, "warped (fixed contours)")
        _show_grid(axes[row, 3], field_np, axis, spacing)
        axes[row, 4].set_facecolor("black")
        log_jacobian = _central_log_jacobian(field_np, axis)
        _show_log_jacobian(fig, axes[row, 4], log_jacobian, fixed_v.shape, axis, spacing)
        for column in range(5):
            _mark_ends(axes[row, column], axis, affine is not None)
    for ax in axes.flat:  # no ticks (they cost most of the drawing); the titles give each panel's size in mm
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    # fixed margins: tight_layout measures every tick label and costs more than the drawing itself
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.04, top=0.9, wspace=0.3, hspace=0.3)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
