"""Register image files end to end: read, bring onto the fixed grid, normalise, run a network, evaluate, write.

Used by the ``monai-unireg`` command line and by the bundles, so both produce the same files:

``warped.nii.gz`` (moving image on the fixed grid), ``warped_label.nii.gz`` (when a moving label is given),
``ddf.nii.gz`` (ITK/ANTs displacement field in LPS mm on the fixed grid, see :mod:`monai_unireg.io`),
``metrics.json`` and ``overview.png``. Results are staged in a temporary folder and moved into place only
when every file is written, so a failure never leaves half a result behind; a run into a folder that holds an
earlier run's results replaces all of them (an earlier result file this run does not write is removed).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

from monai_unireg import io, spatial
from monai_unireg.data import pair_name
from monai_unireg.metrics.field import jacobian_statistics
from monai_unireg.metrics.labels import label_dice
from monai_unireg.spatial import spacing_from_affine
from monai_unireg.transforms.functional import detect_modality, normalise_modality
from monai_unireg.validation import check_informative_image, check_labels, check_option, check_tensor

__all__ = [
    "MODALITIES",
    "LoadedPair",
    "RegistrationResult",
    "resolve_device",
    "detect_modality",
    "read_pair",
    "read_volume",
    "normalise_intensity",
    "register_pair",
    "evaluate_result",
    "write_results",
    "register_files",
    "register_pairs",
    "write_table",
    "OUTPUT_FILES",
    "volume_shape",
]

MODALITIES = ("auto", "ct", "mri")
Log = Callable[[str], None]
#: Every file a registration writes into its output folder (a rerun removes the ones it does not write again).
OUTPUT_FILES = ("warped.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "metrics.json", "overview.png")
#: Labels are sampled in float32 (exact for integers below 2^24); larger values are sampled in float64.
_FLOAT32_EXACT = 2**24


@dataclass
class LoadedPair:
    """A pair on the fixed grid: images ``[1, 1, *S]`` float32 (original intensities), labels ``[1, 1, *S]``.

    When the moving files lie on another grid, ``moving`` / ``moving_label`` are their resampled copies on the
    fixed grid (what the network sees, and the "before" of the metrics), and the originals are kept with
    ``fixed_to_moving`` (``[4, 4]``, fixed voxel -> moving voxel), so the result is sampled once from the original
    through the composed map instead of twice.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    affine: np.ndarray
    fixed_label: torch.Tensor | None = None
    moving_label: torch.Tensor | None = None
    moving_resampled: bool = False
    moving_source: torch.Tensor | None = None
    moving_label_source: torch.Tensor | None = None
    fixed_to_moving: np.ndarray | None = None
    moving_label_values: tuple[int, ...] | None = None
    fixed_label_values: tuple[int, ...] | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Fixed voxel size in mm."""
        return tuple(float(s) for s in spacing_from_affine(self.affine))


@dataclass
class RegistrationResult:
    """Network output brought to the fixed grid: ``ddf [1, 3, *S]`` voxels, warped image and labels."""

    ddf: torch.Tensor
    warped: torch.Tensor
    warped_label: torch.Tensor | None
    runtime_s: float
    modality: str


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None``: CUDA when available, CPU otherwise; anything else as ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine.")
    return resolved


def _check_geometry(shape: tuple[int, ...], affine: np.ndarray, path: str | os.PathLike, name: str) -> tuple[int, ...]:
    """The 3D spatial shape of a volume of ``shape`` (a trailing singleton 4th axis dropped) with a usable affine."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{name} must be a 3D volume, got shape {tuple(shape)} in {str(path)!r}.")
    if min(shape) < 2:
        raise ValueError(f"{name} must have at least 2 voxels along every axis, got shape {tuple(shape)}.")
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    if (
        not np.isfinite(affine).all()
        or abs(float(np.linalg.det(linear))) < 1e-12 * max(float(np.abs(linear).max()), 1e-300) ** 3
    ):
        raise ValueError(
            f"{name} {str(path)!r} has a singular or non-finite voxel-to-world affine (its header's sform/qform "
            f"or voxel sizes are broken: {np.round(affine[:3], 4).tolist()}); expected an invertible matrix."
        )
    return tuple(int(s) for s in shape)


def volume_shape(path: str | os.PathLike, name: str) -> tuple[int, ...]:
    """Spatial shape ``(X, Y, Z)`` of a 3D NIfTI file from its header alone (no voxel data is read), with the
    same checks on shape and affine as :func:`read_volume`; raises ``ValueError`` naming ``name`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: path {str(path)!r} does not exist or is not a file.")
    try:
        image = nib.load(str(path))
        shape, affine = tuple(image.shape), image.affine
    except Exception as error:
        raise ValueError(f"{name}: path {str(path)!r} is not a readable NIfTI file: {error}") from None
    return _check_geometry(shape, affine, path, name)


def read_volume(path: str | os.PathLike, name: str) -> tuple[torch.Tensor, np.ndarray]:
    """``[1, 1, X, Y, Z]`` tensor and affine of a 3D NIfTI file (a trailing singleton 4th axis is dropped)."""
    try:
        array, affine = io.load_nifti(path)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    _check_geometry(tuple(array.shape), affine, path, name)
    if array.ndim == 4:
        array = array[..., 0]
    tensor = torch.from_numpy(np.asarray(array))[None, None]
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} ({str(path)!r}) contains NaN or Inf values.")
    return tensor, affine


def _read_label(
    path: str | os.PathLike, name: str, image_shape: tuple[int, ...], image_affine: np.ndarray
) -> torch.Tensor:
    label, affine = read_volume(path, name)
    check_labels(label, name)
    if tuple(label.shape[2:]) != image_shape or not np.allclose(affine, image_affine, atol=1e-3):
        raise ValueError(
            f"{name} must lie on its image's grid (shape {image_shape} and the same affine), got shape "
            f"{tuple(label.shape[2:])} in {str(path)!r}."
        )
    return torch.round(label.to(torch.float64)).to(torch.int32) if label.is_floating_point() else label.to(torch.int32)


def read_pair(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    fixed_label: str | os.PathLike | None = None,
    moving_label: str | os.PathLike | None = None,
) -> LoadedPair:
    """Read a pair of NIfTI files with their affines and bring the moving image onto the fixed grid.

    When the moving image has another shape or affine (another voxel size, orientation or field of view), it
    and its label are resampled onto the fixed grid in physical space (trilinear for the image, nearest neighbour
    for the label, one ``grid_sample`` each; zero outside the moving field of view), so the identity field means
    "same physical point" and the result is right for images straight from a scanner.

    Raises:
        ValueError: naming the argument, for missing or unreadable files, non-3D volumes, NaN/Inf values,
            non-integer or empty labels, a constant image, or a label not on its image's grid.
    """
    fixed_image, fixed_affine = read_volume(fixed, "fixed")
    moving_image, moving_affine = read_volume(moving, "moving")
    check_informative_image(fixed_image, f"fixed image {os.fspath(fixed)!r}")
    check_informative_image(moving_image, f"moving image {os.fspath(moving)!r}")
    fixed_shape, moving_shape = tuple(fixed_image.shape[2:]), tuple(moving_image.shape[2:])
    labels = {
        "fixed_label": None
        if fixed_label is None
        else _read_label(fixed_label, "fixed_label", fixed_shape, fixed_affine),
        "moving_label": None
        if moving_label is None
        else _read_label(moving_label, "moving_label", moving_shape, moving_affine),
    }
    moving_values = None if labels["moving_label"] is None else _label_values(labels["moving_label"])
    fixed_values = None if labels["fixed_label"] is None else _label_values(labels["fixed_label"])
    fixed_image, moving_image = fixed_image.to(torch.float32), moving_image.to(torch.float32)
    resample = moving_shape != fixed_shape or not np.allclose(moving_affine, fixed_affine, atol=1e-3)
    if not resample:
        return LoadedPair(
            fixed_image,
            moving_image,
            fixed_affine,
            moving_label_values=moving_values,
            fixed_label_values=fixed_values,
            **labels,
        )
    mapping = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(fixed_affine, np.float64)
    coords = _mapped_coordinates(mapping, fixed_shape)
    source, label_source = moving_image, labels["moving_label"]
    moving_image = spatial.sample(source, coords, "bilinear", "zeros")
    if label_source is not None:
        labels["moving_label"] = _sample_labels(label_source, coords)
    return LoadedPair(
        fixed_image,
        moving_image,
        fixed_affine,
        moving_resampled=True,
        moving_source=source,
        moving_label_source=label_source,
        fixed_to_moving=mapping,
        moving_label_values=moving_values,
        fixed_label_values=fixed_values,
        **labels,
    )


def _label_values(label: torch.Tensor) -> tuple[int, ...]:
    """The non-zero label values of a label map, sorted."""
    return tuple(int(v) for v in torch.unique(label) if int(v) != 0)


def _mapped_coordinates(mapping: np.ndarray, shape: Sequence[int], ddf: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, 3, *shape]`` float32 coordinates ``M (x + ddf(x))`` for the ``[4, 4]`` voxel map ``M`` (float64 maths
    for the matrix, float32 for the grid: sub-millivoxel accurate for grids below 10^4 voxels a side)."""
    matrix = torch.from_numpy(np.asarray(mapping, np.float64))
    points = spatial.identity_grid(tuple(shape), dtype=torch.float32).unsqueeze(0)
    if ddf is not None:
        points = points + ddf.to(torch.float32)
    linear, offset = matrix[:3, :3].to(torch.float32), matrix[:3, 3].to(torch.float32)
    return torch.einsum("ij,bj...->bi...", linear, points) + offset.view(1, 3, 1, 1, 1)


def _sample_labels(labels: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour labels at ``coords`` (one ``grid_sample`` over the label tensor, whatever the number of
    labels; outside the grid: 0)."""
    if labels.numel() and int(labels.abs().max()) >= _FLOAT32_EXACT:
        coords = coords.to(torch.float64)
    return spatial.sample_labels(labels, coords, method="nearest", padding_mode="zeros")


def normalise_intensity(
    image: torch.Tensor,
    modality: str,
    ct_window: Sequence[float] = (-800.0, 500.0),
    output_range: Sequence[float] = (0.0, 1.0),
) -> torch.Tensor:
    """Map an image to ``output_range``: CT by an HU window, MRI by [min, 99th percentile] (see the transforms).

    Args:
        image: ``[1, 1, *S]`` image in original intensities.
        modality: ``"ct"`` or ``"mri"`` (resolve ``"auto"`` with :func:`detect_modality` first).
        ct_window: ``(a_min, a_max)`` HU window (VoxelOpt: [-800, 500]).
        output_range: ``(b_min, b_max)`` the window or percentile range is mapped to ([0, 1]; UniReg [-1, 1]).
    """
    check_tensor(image, "image")
    x = image if image.is_floating_point() else image.to(torch.float32)
    return normalise_modality(x, modality, ct_window, output_range)


def register_pair(
    network: nn.Module,
    pair: LoadedPair,
    modality: str = "auto",
    device: str | torch.device | None = "auto",
    ct_window: Sequence[float] = (-800.0, 500.0),
    intensity_range: Sequence[float] = (0.0, 1.0),
) -> RegistrationResult:
    """Run ``network(moving, fixed) -> ddf`` on a normalised pair and warp the original moving image and label.

    With ``modality="auto"`` each image is normalised by its own detected modality (a CT-MRI pair gets the CT
    window for the CT and the MRI percentiles for the MR); the result's ``modality`` is then ``"ct/mri"``.
    Both images are mapped to ``intensity_range`` ([0, 1]; UniReg: [-1, 1]) before the network sees them.
    The runtime covers the network call only (feature extraction included; file I/O excluded).
    """
    check_option(modality, "modality", MODALITIES)
    fixed_modality = detect_modality(pair.fixed) if modality == "auto" else modality
    moving_modality = detect_modality(pair.moving) if modality == "auto" else modality
    resolved = fixed_modality if fixed_modality == moving_modality else f"{fixed_modality}/{moving_modality}"
    device = resolve_device(device)
    fixed = normalise_intensity(pair.fixed, fixed_modality, ct_window, intensity_range).to(device)
    moving = normalise_intensity(pair.moving, moving_modality, ct_window, intensity_range).to(device)
    network = network.to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        ddf = network(moving, fixed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runtime = time.perf_counter() - start
    del fixed, moving
    ddf = ddf.detach().to("cpu", torch.float32)
    warped, warped_label = warp_moving(pair, ddf)
    return RegistrationResult(ddf, warped, warped_label, runtime, resolved)


def warp_moving(pair: LoadedPair, ddf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The moving image (trilinear) and label (nearest neighbour) warped by ``ddf [1, 3, *S]`` onto the fixed grid,
    zero outside the moving field of view. A moving pair read from another grid is sampled once, from its
    original files through the composed map (fixed voxel -> ``x + ddf(x)`` -> moving voxel)."""
    if pair.fixed_to_moving is None:
        coords = spatial.identity_grid(tuple(ddf.shape[2:]), dtype=torch.float32).unsqueeze(0) + ddf
        image, label = pair.moving, pair.moving_label
    else:
        coords = _mapped_coordinates(pair.fixed_to_moving, tuple(ddf.shape[2:]), ddf)
        image, label = pair.moving_source, pair.moving_label_source
    warped = spatial.sample(image, coords, "bilinear", "zeros")
    warped_label = None if label is None else _sample_labels(label, coords)
    return warped, warped_label


def evaluation_labels(pair: LoadedPair, labels: Sequence[int] | None = None) -> tuple[tuple[int, ...], str]:
    """The label values the metrics average over, and how they were chosen (for the headline).

    Args:
        labels: the values asked for (e.g. a dataset's evaluation list); ``None``: every non-zero label present
            in both the fixed and the moving label map.

    Raises:
        ValueError: a value of ``labels`` that is negative or 0 (background), repeated, or in neither label map.
    """
    if pair.fixed_label is None or pair.moving_label is None:
        raise ValueError("labels need both label maps (fixed_label and moving_label).")
    fixed_values = set(pair.fixed_label_values or _label_values(pair.fixed_label))
    moving_values = set(pair.moving_label_values or _label_values(pair.moving_label))
    if labels is None:
        both = tuple(sorted(fixed_values & moving_values))
        if not both:
            raise ValueError(
                "the fixed and moving label maps share no label value (fixed: "
                f"{_values_text(fixed_values)}; moving: {_values_text(moving_values)}): nothing to evaluate."
            )
        return both, f"all {len(both)} labels present in both maps"
    values = [int(v) for v in labels]
    bad = [v for v in values if v <= 0]
    if bad:
        raise ValueError(f"labels must be positive label values (0 is the background), got {bad[0]}.")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"labels must be distinct, got {repeated[0]} more than once.")
    absent = [v for v in values if v not in fixed_values and v not in moving_values]
    if absent:
        raise ValueError(
            f"labels {', '.join(map(str, absent))} {'is' if len(absent) == 1 else 'are'} in neither label map "
            f"(fixed: {_values_text(fixed_values)}; moving: {_values_text(moving_values)})."
        )
    return tuple(values), f"the {len(values)} labels given (--labels)"


def _values_text(values: set[int], limit: int = 12) -> str:
    ordered = sorted(values)
    if not ordered:
        return "none"
    shown = ", ".join(map(str, ordered[:limit]))
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def evaluate_result(
    pair: LoadedPair, result: RegistrationResult, labels: Sequence[int] | None = None, *, surface: bool = True
) -> dict:
    """Metrics of one registration: SDlogJ (Learn2Reg "+3"), % folding, runtime and, with both labels,
    Dice (after and before registration) and HD95 (mm) per label with their means.

    Args:
        labels: label values to evaluate; ``None`` takes every non-zero label present in both label maps (see
            :func:`evaluation_labels`; ``metrics["dice_labels"]`` says which were used).
        surface: also compute HD95 (the slowest metric).
    """
    # this pair's values (JacobianMetric's for one call, without importing MONAI when there are no labels), not an
    # aggregate(): that gathers across torch.distributed ranks, which register other pairs (multi_gpu_evaluate.yaml)
    sdlogj, folding = jacobian_statistics(result.ddf)[0].tolist()
    metrics: dict = {
        "sdlogj": sdlogj,
        "folding_percent": folding,
        "runtime_s": result.runtime_s,
        "modality": result.modality,
        "moving_resampled_to_fixed_grid": pair.moving_resampled,
    }
    if pair.fixed_label is None or result.warped_label is None:
        return metrics
    label_values, chosen = evaluation_labels(pair, labels)
    # LabelDiceMetric's and HD95Metric's values for one call, as functions (MONAI is not imported for them)
    dice = label_dice(result.warped_label, pair.fixed_label, label_values)[0]
    before = label_dice(pair.moving_label, pair.fixed_label, label_values)[0]
    metrics["dice_labels"] = list(label_values)
    metrics["dice_labels_chosen"] = chosen
    metrics["dice"] = {str(v): _finite_or_none(d) for v, d in zip(label_values, dice.tolist())}
    metrics["dice_mean"] = _finite_or_none(float(torch.nanmean(dice)))
    metrics["dice_before"] = {str(v): _finite_or_none(d) for v, d in zip(label_values, before.tolist())}
    metrics["dice_mean_before"] = _finite_or_none(float(torch.nanmean(before)))
    if surface:
        hd95 = _hd95(result.warped_label, pair.fixed_label, label_values, pair.spacing)
        metrics["hd95_mm"] = {str(v): _finite_or_none(h) for v, h in zip(label_values, hd95.tolist())}
        metrics["hd95_mm_mean"] = _finite_or_none(float(torch.nanmean(hd95)))
    return metrics


def _hd95(warped: torch.Tensor, fixed: torch.Tensor, values: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
    """``[L]`` HD95 in mm of one pair as ``HD95Metric(labels=values, spacing=spacing)`` gives it: a label present in
    one map only has no distance (NaN, skipped by the mean), with the metric's warning. Imported here: it needs
    scipy, 0.2 s of the command's start-up when no labels are given."""
    from monai_unireg.metrics.hausdorff import label_hausdorff_distance, replace_one_sided

    table = label_hausdorff_distance(warped, fixed, values, spacing)
    return replace_one_sided(table, values, stacklevel=3)[0]


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in values)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _label_dtype(label: torch.Tensor) -> torch.dtype:
    """The smallest of uint8 / int16 / int32 that holds every value of ``label``."""
    low, high = (int(label.min()), int(label.max())) if label.numel() else (0, 0)
    if low >= 0 and high <= 255:
        return torch.uint8
    if low >= -(2**15) and high < 2**15:
        return torch.int16
    return torch.int32


def prepare_output_folder(out_dir: str | os.PathLike, name: str = "out_dir") -> list[Path]:
    """Make ``out_dir`` (and its parents), check by a test write that files can be created in it, and remove the
    temporaries an interrupted earlier run left there; returns what was removed.

    Raises:
        ValueError: naming ``name`` and the folder, when it is a file, lies below a file, cannot be created or is
            not writable (read-only, permissions, full disk).
    """
    folder = Path(out_dir)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"lies below {str(parent)!r}, which is a file"
            raise ValueError(f"{name} {str(folder)!r} {where}; expected a folder (existing or to be made).")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name} {str(folder)!r} cannot be created: {error.strerror or error}.") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test.", suffix=io.TEMPORARY_INFIX, dir=folder)
        try:
            os.write(handle, b"monai_unireg write test\n")
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{name} {str(folder)!r} is not writable: {error.strerror or error}.") from None
    return io.remove_stale_temporaries(folder)


def write_results(
    out_dir: str | os.PathLike,
    pair: LoadedPair,
    result: RegistrationResult,
    metrics: dict,
    *,
    overview: bool = True,
    log: Log | None = None,
    writing_started: float | None = None,
) -> list[Path]:
    """Write the result files into ``out_dir`` (staged in a temporary folder, then moved into place), each with
    the mode the umask gives; an earlier run's result file (:data:`OUTPUT_FILES`) that this run does not write
    (e.g. ``warped_label.nii.gz`` of a run with labels, or ``overview.png`` with ``overview=False``) is removed,
    so the folder holds one run's results. Returns the files written.

    Raises:
        ValueError: ``out_dir`` is a file, lies below one or is not writable (:func:`prepare_output_folder`).
        OSError: writing failed (e.g. a full disk); one line naming ``out_dir``; nothing of this run is kept.
    """
    out_dir = Path(out_dir)
    prepare_output_folder(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        try:
            _write_staged(staging, pair, result, metrics, overview, writing_started)
        except OSError as error:  # e.g. a full disk: the staged files go, earlier results stay as they were
            raise OSError(
                error.errno,
                f"could not write the results to {str(out_dir)!r}: {error.strerror or error}; nothing of this run "
                "was kept (earlier results there are unchanged)",
            ) from error
        written = []
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
        stale = [out_dir / name for name in OUTPUT_FILES if out_dir / name not in written]
        for path in stale:
            if path.is_file() or path.is_symlink():
                path.unlink()
                if log is not None:
                    log(f"      removed {path.name} of an earlier run (this run does not write it)")
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_staged(
    staging: Path,
    pair: LoadedPair,
    result: RegistrationResult,
    metrics: dict,
    overview: bool,
    writing_started: float | None = None,
) -> None:
    """Every result file into the staging folder, each through :func:`io.atomic_path` (umask respected)."""
    io.save_nifti(result.warped[0, 0], pair.affine, staging / "warped.nii.gz")
    if result.warped_label is not None:
        label = result.warped_label[0, 0]
        io.save_nifti(label.to(_label_dtype(label)), pair.affine, staging / "warped_label.nii.gz")
    io.save_ddf(result.ddf, pair.affine, staging / "ddf.nii.gz")
    if overview:
        from monai_unireg.visualize import save_overview  # Pillow: imported only when drawing

        save_overview(
            staging / "overview.png",
            pair.fixed,
            pair.moving,
            result.warped,
            result.ddf[0],
            fixed_label=pair.fixed_label,
            moving_label=pair.moving_label,
            warped_label=result.warped_label,
            affine=pair.affine,
            title=_overview_title(metrics),
        )
    if writing_started is not None and "timing_s" in metrics:  # metrics.json last, with the writing time (nearly all)
        metrics["timing_s"]["writing"] = round(time.perf_counter() - writing_started, 3)
    with io.atomic_path(staging / "metrics.json") as temporary:
        temporary.write_text(json.dumps(metrics, indent=2))


def _overview_title(metrics: dict) -> str:
    """Two lines: the mean Dice after and before registration and which labels it averages; the field's
    regularity and the registration time."""
    lines = []
    if metrics.get("dice_mean") is not None:
        before = _number(metrics.get("dice_mean_before"), ".3f")
        lines.append(f"mean Dice {metrics['dice_mean']:.3f} (before {before}) over {metrics['dice_labels_chosen']}")
    regularity = (
        f"SDlogJ {metrics['sdlogj']:.3f}, folding {metrics['folding_percent']:.2f} %, " if "sdlogj" in metrics else ""
    )
    lines.append(f"{regularity}registration {metrics['runtime_s']:.2f} s")
    return "\n".join(lines)


NetworkOrFactory = nn.Module | Callable[[tuple[int, ...]], nn.Module]


class _Stages:
    """Numbered stage lines (``[k/N] name``) through ``log``, and the seconds each stage took."""

    def __init__(self, names: Sequence[str], log: Log) -> None:
        self.names, self.log = list(names), log
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self.started = 0.0

    def start(self, name: str, detail: str = "") -> None:
        self.finish()
        self._current, self.started = name, time.perf_counter()
        self.log(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}{' ' + detail if detail else ''}")

    def finish(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = round(time.perf_counter() - self.started, 3)
            self._current = None


def register_files(
    network: NetworkOrFactory,
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    out_dir: str | os.PathLike,
    fixed_label: str | os.PathLike | None = None,
    moving_label: str | os.PathLike | None = None,
    modality: str = "auto",
    device: str | torch.device | None = "auto",
    labels: Sequence[int] | None = None,
    ct_window: Sequence[float] = (-800.0, 500.0),
    log: Log = print,
    intensity_range: Sequence[float] = (0.0, 1.0),
    *,
    metrics: bool = True,
    overview: bool = True,
) -> dict:
    """Register one pair of files and write every result file to ``out_dir``; returns the metrics.

    Args:
        network: a registration module, or a function of the fixed grid's spatial shape returning one
            (for methods whose configuration depends on the volume size); it is built from the fixed file's
            header before any voxel data is read, so a bad network option fails at once.
        intensity_range: range the images are normalised to for the network ([0, 1]; UniReg: [-1, 1]).
        metrics: evaluate (Jacobian, Dice and HD95 with labels); ``False`` for batch use writes only the timing in
            ``metrics.json``.
        overview: draw ``overview.png``.

    ``metrics["timing_s"]`` holds the seconds of each stage (reading, registering, evaluating, writing).
    """
    check_option(modality, "modality", MODALITIES)
    names = ["reading", "registering", *(["evaluating"] if metrics else []), "writing"]
    stages = _Stages(names, log)
    if not isinstance(network, nn.Module):
        network = network(volume_shape(fixed, "fixed"))
    stages.start("reading", f"{fixed} and {moving}")
    pair = read_pair(fixed, moving, fixed_label, moving_label)
    if metrics and pair.fixed_label is not None and pair.moving_label is not None:
        evaluation_labels(pair, labels)  # refuse bad label values before registering (labels unused without maps)
    if pair.moving_resampled:
        log("      moving image resampled onto the fixed grid (physical space)")
    grid = f"grid {tuple(pair.fixed.shape[2:])}, spacing {_rounded(pair.spacing)} mm"
    stages.start("registering", f"on {resolve_device(device)} ({grid})")
    result = register_pair(network, pair, modality, device, ct_window, intensity_range)
    log(f"      network {result.runtime_s:.2f} s ({result.modality.upper()} intensities)")
    values: dict = {"runtime_s": result.runtime_s, "modality": result.modality}
    if metrics:
        stages.start("evaluating")
        values = evaluate_result(pair, result, labels)
        if values.get("dice_mean") is not None:
            before = _number(values["dice_mean_before"], ".4f")
            log(
                f"      mean Dice {values['dice_mean']:.4f} (before {before}) over {values['dice_labels_chosen']}"
                f", mean HD95 {_number(values.get('hd95_mm_mean'), '.2f')} mm"
            )
        log(f"      SDlogJ {values['sdlogj']:.4f}, folding {values['folding_percent']:.3f} %")
    stages.start("writing", f"results to {out_dir}")
    values["timing_s"] = dict(stages.seconds)
    write_results(out_dir, pair, result, values, overview=overview, log=log, writing_started=stages.started)
    stages.finish()
    values["timing_s"] = dict(stages.seconds)
    return values


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def register_pairs(
    network: NetworkOrFactory,
    pairs: Sequence[dict],
    output_dir: str | os.PathLike,
    modality: str = "auto",
    device: str | torch.device | None = "auto",
    labels: Sequence[int] | None = None,
    ct_window: Sequence[float] = (-800.0, 500.0),
    log: Log = print,
    intensity_range: Sequence[float] = (0.0, 1.0),
) -> list[dict]:
    """Register every pair dict (``fixed_image``, ``moving_image``, optional ``fixed_label``, ``moving_label``)
    into ``output_dir/<pair name>/``; returns one row per pair (``pair`` name + metrics). ``intensity_range``: as
    :func:`register_files`."""
    rows = []
    quiet: Log = lambda message: None  # noqa: E731
    for index, pair in enumerate(pairs, start=1):
        name = pair_name(pair)
        metrics = register_files(
            network,
            pair["fixed_image"],
            pair["moving_image"],
            Path(output_dir) / name,
            pair.get("fixed_label"),
            pair.get("moving_label"),
            modality,
            device,
            labels,
            ct_window,
            log=quiet,
            intensity_range=intensity_range,
        )
        summary = f"Dice {metrics['dice_mean']:.4f}, " if metrics.get("dice_mean") is not None else ""
        log(f"[{index}/{len(pairs)}] {name}: {summary}SDlogJ {metrics['sdlogj']:.4f}, {metrics['runtime_s']:.2f} s")
        rows.append({"pair": name, **metrics})
    return rows


TABLE_COLUMNS = ("pair", "dice_mean", "hd95_mm_mean", "sdlogj", "folding_percent", "runtime_s")


def write_table(rows: Sequence[dict], csv_path: str | os.PathLike, summary_path: str | os.PathLike) -> dict:
    """Per-pair CSV of Dice, HD95 (mm), SDlogJ, % folding and runtime, plus a JSON summary (mean, std, n)."""
    csv_path, summary_path = Path(csv_path), Path(summary_path)
    with io.atomic_path(csv_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_COLUMNS)
        for row in rows:
            writer.writerow([row.get(column) for column in TABLE_COLUMNS])
    summary = {}
    for column in TABLE_COLUMNS[1:]:
        values = np.array([row[column] for row in rows if row.get(column) is not None], dtype=float)
        if values.size:
            summary[column] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    with io.atomic_path(summary_path) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    return summary
