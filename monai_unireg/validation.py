"""Argument checks shared by every public function, loss, metric and transform.

Each check raises ``ValueError`` whose message names the offending argument and states what was
expected, so that bad input fails loudly at the boundary instead of producing silent garbage.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "LOSS_REDUCTIONS",
    "check_reduction",
    "plain_tensor",
    "check_tensor",
    "check_image",
    "check_ddf",
    "check_same_spatial_shape",
    "check_image_pair",
    "check_informative_image",
    "check_labels",
    "check_option",
    "check_number",
    "check_positive",
    "check_affine",
    "check_spacing",
    "check_integer",
    "check_bool",
]


def check_tensor(x: Any, name: str, *, ndim: int | None = None, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating or integer ``torch.Tensor`` of rank ``ndim`` holding finite values.

    Args:
        x: the value to check.
        name: argument name used in the error message.
        ndim: required number of dimensions, or ``None`` for any.
        finite: reject NaN and +/-Inf values.

    Returns:
        ``x`` unchanged.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)} ({x.ndim} dimensions).")
    # Under tracing (TorchScript export) the value check is skipped: it is a data-dependent branch on the example.
    if finite and x.is_floating_point() and x.numel() and not torch.jit.is_tracing() and not _all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values; expected finite values.")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of the non-empty floating ``x`` is finite, from its minimum and maximum (one reduction:
    NaN propagates to both, an infinity is one of them). On the CPU 20x faster than ``isfinite(x).all()``, which
    writes a boolean volume first (0.45 ms against 9-12 ms for a 2 mm brain field; the refinement checks its field
    at every step)."""
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(torch.stack((low, high))).all())


def check_image(x: Any, name: str, spatial_dims: int = 3, *, finite: bool = True) -> torch.Tensor:
    """Check a channel-first batched image ``[B, C, *spatial]`` with ``spatial_dims`` spatial axes."""
    x = check_tensor(x, name, finite=finite)
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must be a batched channel-first image of shape [B, C, {', '.join('DHW'[-spatial_dims:])}] "
            f"({spatial_dims + 2} dimensions), got shape {tuple(x.shape)}."
        )
    if min(x.shape) == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")
    return x


def check_ddf(ddf: Any, name: str = "ddf", spatial_dims: int = 3) -> torch.Tensor:
    """Check a displacement field ``[B, spatial_dims, *spatial]`` of finite floating values."""
    ddf = check_image(ddf, name, spatial_dims)
    if ddf.shape[1] != spatial_dims:
        raise ValueError(
            f"{name} must have {spatial_dims} channels (one displacement component per spatial axis), "
            f"got shape {tuple(ddf.shape)}."
        )
    if not ddf.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {ddf.dtype}.")
    return ddf


def check_same_spatial_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Check that two batched tensors share batch size and spatial shape (channels may differ)."""
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size and spatial shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_image_pair(moving: Any, fixed: Any, spatial_dims: int = 3) -> None:
    """Check a registration pair: two finite images ``[B, C, *spatial]`` of exactly the same shape."""
    check_image(moving, "moving", spatial_dims)
    check_image(fixed, "fixed", spatial_dims)
    if moving.shape != fixed.shape:
        raise ValueError(
            f"moving and fixed must have the same shape (bring them onto one grid first), "
            f"got {tuple(moving.shape)} and {tuple(fixed.shape)}."
        )


#: Fewest voxels (as a fraction of all) that must differ from an image's median for it to carry structure.
INFORMATIVE_FRACTION = 1e-4


def check_informative_image(x: Any, name: str) -> None:
    """Refuse a constant or nearly constant image: there is nothing in it to register.

    An image is refused when fewer than ``max(8, INFORMATIVE_FRACTION * voxels)`` of its voxels differ from its
    (subsampled) median by more than ``1e-6`` of its largest magnitude (all-zero, all-one, a constant plus rounding
    noise, or a blank volume with a handful of stray voxels). Such an image gives a similarity that is flat or decided
    by noise, and every method would return a field of whatever its regulariser and ties make of it.

    Args:
        x: image tensor of any shape (e.g. ``[B, C, D, H, W]`` or ``[C, D, H, W]``), finite values.
        name: what to call it in the message, e.g. ``"fixed image 'a.nii.gz'"``.
    """
    values = plain_tensor(check_tensor(x, name)).detach().reshape(-1)
    values = values if values.is_floating_point() else values.to(torch.float32)
    if values.numel() == 0:
        raise ValueError(f"{name} must not be empty.")
    # The median of an even subsample (<= ~100k voxels) is enough: a nearly constant image has its constant there.
    median = values[:: max(1, values.numel() // 100_000)].median()
    scale = float(values.abs().max())
    differing = int(((values - median).abs() > 1e-6 * scale).sum())
    if differing < max(8, INFORMATIVE_FRACTION * values.numel()):
        detail = (
            f"every voxel equals {float(median):g} to 1 part in a million"
            if differing == 0
            else f"only {differing} of {values.numel()} voxels differ from {float(median):g}"
        )
        raise ValueError(f"{name} is constant or nearly so ({detail}); there is nothing in it to register.")


def check_labels(x: Any, name: str, *, allow_empty: bool = False) -> None:
    """Check an integer label map (tensor or array): finite, integer-valued and not empty.

    Args:
        x: label map; floating dtypes are accepted when every value is a whole number.
        name: argument name used in the error message.
        allow_empty: accept a map without any non-zero (foreground) label.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a label map (torch.Tensor or numpy array), got {type(x).__name__}.")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")
    if x.dtype == torch.bool:
        return
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values; expected an integer label map.")
        if not bool((x == torch.round(x)).all()):
            raise ValueError(f"{name} must hold integer label values, got non-integer values (dtype {x.dtype}).")
    if not allow_empty and not bool((x != 0).any()):
        raise ValueError(f"{name} is empty: it holds no non-zero (foreground) label.")


#: Loss reductions: the values of MONAI's ``LossReduction`` (kept here so that the losses need not import MONAI).
LOSS_REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: Any) -> str:
    """Check a loss ``reduction`` (``"none"``, ``"mean"``, ``"sum"`` or a MONAI ``LossReduction``); its string."""
    return str(getattr(check_option(reduction, "reduction", LOSS_REDUCTIONS), "value", reduction))


def check_option(value: Any, name: str, allowed: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``allowed``; return it unchanged."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    return value


def _is_real_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_number(value: Any, name: str) -> Any:
    """Check that ``value`` is a finite real number (not a bool); return it unchanged."""
    if not _is_real_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return value


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> Any:
    """Check that a number (or every number of a sequence) is finite and positive (or >= 0 with allow_zero)."""
    values: Sequence[Any] = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not _is_real_number(v):
            raise ValueError(f"{name} must be a number, got {v!r}.")
        if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value!r}.")
    return value


def check_affine(affine: Any, name: str = "affine", spatial_dims: int = 3) -> torch.Tensor:
    """Check an affine ``[n+1, n+1]`` or batched ``[B, n+1, n+1]`` (voxel index -> world mm), invertible.

    Returns:
        the affine as a float64 tensor.
    """
    if isinstance(affine, np.ndarray):
        affine = torch.from_numpy(affine)
    affine = check_tensor(affine, name)
    n = spatial_dims + 1
    if affine.shape[-2:] != (n, n) or affine.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape [{n}, {n}] or [B, {n}, {n}], got {tuple(affine.shape)}.")
    affine = affine.to(torch.float64)
    if bool((torch.linalg.det(affine[..., :-1, :-1]).abs() < 1e-12).any()):
        raise ValueError(f"{name} must be invertible; its linear part is singular.")
    return affine


def check_spacing(spacing: Any, name: str = "spacing", spatial_dims: int = 3) -> tuple[float, ...]:
    """Check a voxel spacing in mm: ``spatial_dims`` finite positive numbers; return it as a tuple of floats."""
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, np.ndarray):
        spacing = spacing.tolist()
    if not isinstance(spacing, (list, tuple)) or len(spacing) != spatial_dims:
        raise ValueError(f"{name} must list {spatial_dims} voxel sizes in mm, got {spacing!r}.")
    check_positive(list(spacing), name)
    return tuple(float(s) for s in spacing)


def check_integer(value: Any, name: str, minimum: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool), at least ``minimum`` when given; return it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}.")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """Check that ``value`` is a bool; return it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}.")
    return value


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """The data of ``x`` without MONAI ``MetaTensor`` metadata (which only slows batch and elementwise work down).

    MONAI is not imported for the check: while it is not loaded, ``x`` cannot be a ``MetaTensor`` (this module is
    on the command line's import path, which MONAI would make about 3 s slower)."""
    meta_tensor = sys.modules.get("monai.data.meta_tensor")
    return x.as_tensor() if meta_tensor is not None and isinstance(x, meta_tensor.MetaTensor) else x
