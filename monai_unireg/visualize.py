"""Registration overview pictures: image slices with label contours, a deformation grid and a log-Jacobian map."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from monai_unireg.io import atomic_path  # noqa: E402
from monai_unireg.spatial import jacobian_determinant  # noqa: E402
from monai_unireg.validation import check_spacing  # noqa: E402

__all__ = ["save_overview"]

PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))
GRID_STEP = 4


def _as_volume(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``[X, Y, Z]`` (or with singleton batch/channel axes) -> numpy ``[X, Y, Z]``."""
    volume = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    volume = volume.reshape(volume.shape[-3:]) if volume.ndim > 3 and np.prod(volume.shape[:-3]) == 1 else volume
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume [X, Y, Z], got shape {volume.shape}.")
    return volume


def _slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """Central slice across ``axis``, transposed so the first remaining axis runs left-right."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis).T


def _extent(shape: Sequence[int], spacing: Sequence[float], axis: int) -> tuple[float, float, float, float]:
    kept = [a for a in range(3) if a != axis]
    return (0.0, shape[kept[0]] * spacing[kept[0]], 0.0, shape[kept[1]] * spacing[kept[1]])


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


def _show_grid(ax, ddf: np.ndarray, axis: int, spacing) -> None:
    """Deformed grid lines ``x + u(x)`` of the central slice (in-plane components, mm)."""
    kept = [a for a in range(3) if a != axis]
    shape = ddf.shape[1:]
    index = shape[axis] // 2
    u = [np.take(ddf[a], index, axis=axis) for a in kept]
    grid = np.meshgrid(np.arange(shape[kept[0]]), np.arange(shape[kept[1]]), indexing="ij")
    x = (grid[0] + u[0]) * spacing[kept[0]]
    y = (grid[1] + u[1]) * spacing[kept[1]]
    for i in range(0, x.shape[0], GRID_STEP):
        ax.plot(x[i, :], y[i, :], color="tab:blue", linewidth=0.5)
    for j in range(0, x.shape[1], GRID_STEP):
        ax.plot(x[:, j], y[:, j], color="tab:blue", linewidth=0.5)
    ax.set_xlim(*_extent(shape, spacing, axis)[:2])
    ax.set_ylim(*_extent(shape, spacing, axis)[2:])
    ax.set_aspect("equal")
    ax.set_title("deformation grid", fontsize=8)


def _show_log_jacobian(fig, ax, log_jacobian: np.ndarray, axis: int, spacing) -> None:
    limit = max(float(np.nanmax(np.abs(log_jacobian))), 1e-3)
    shown = ax.imshow(_slice(log_jacobian, axis), cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower",
                      extent=_extent(log_jacobian.shape, spacing, axis))  # fmt: skip
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
    title: str | None = None,
) -> Path:
    """Write a PNG: for the three central orthogonal slices, fixed / moving / warped images with label
    contours (fixed contours drawn over the warped image too, to judge alignment), the deformed grid and
    the log-Jacobian determinant map (non-positive determinants, i.e. folding, shown black).

    Args:
        path: output ``.png`` (written atomically).
        fixed, moving, warped: ``[X, Y, Z]`` images on the fixed grid (moving may be on it after resampling).
        ddf: ``[3, X, Y, Z]`` displacement in voxels of the fixed grid.
        fixed_label, moving_label, warped_label: optional ``[X, Y, Z]`` integer label maps.
        spacing: voxel size in mm, for true proportions.
        title: figure title.

    Returns:
        the path written.
    """
    spacing = check_spacing(spacing)
    fixed_v, moving_v, warped_v = (
        _as_volume(v, n) for v, n in ((fixed, "fixed"), (moving, "moving"), (warped, "warped"))
    )
    field = ddf.detach().cpu() if isinstance(ddf, torch.Tensor) else torch.as_tensor(np.asarray(ddf))
    field = field.reshape(3, *field.shape[-3:]).to(torch.float64)
    if field.shape[1:] != fixed_v.shape:
        raise ValueError(f"ddf must have shape [3, {', '.join(map(str, fixed_v.shape))}], got {tuple(field.shape)}.")
    given = {"fixed_label": fixed_label, "moving_label": moving_label, "warped_label": warped_label}
    labels = {name: None if value is None else _as_volume(value, name) for name, value in given.items()}
    determinant = jacobian_determinant(field.unsqueeze(0))[0, 0].numpy()
    log_jacobian = np.where(determinant > 0, np.log(np.clip(determinant, 1e-9, None)), np.nan)
    field_np = field.numpy()

    fig, axes = plt.subplots(3, 5, figsize=(15, 9))
    for row, (plane, axis) in enumerate(PLANES):
        _show_image(axes[row, 0], fixed_v, axis, spacing, labels["fixed_label"], f"fixed ({plane})")
        _show_image(axes[row, 1], moving_v, axis, spacing, labels["moving_label"], "moving")
        warped_contours = labels["fixed_label"] if labels["fixed_label"] is not None else labels["warped_label"]
        _show_image(axes[row, 2], warped_v, axis, spacing, warped_contours, "warped (fixed contours)")
        _show_grid(axes[row, 3], field_np, axis, spacing)
        axes[row, 4].set_facecolor("black")
        _show_log_jacobian(fig, axes[row, 4], log_jacobian, axis, spacing)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
