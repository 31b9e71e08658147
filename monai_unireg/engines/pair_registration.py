"""Register image files end to end: read, bring onto the fixed grid, normalise, run a network, evaluate, write.

Used by the ``monai-unireg`` command line and by the bundles, so both produce the same files:

``warped.nii.gz`` (moving image on the fixed grid), ``warped_label.nii.gz`` (when a moving label is given),
``ddf.nii.gz`` (ITK/ANTs displacement field in LPS mm on the fixed grid, see :mod:`monai_unireg.io`),
``metrics.json`` and ``overview.png``. Results are staged in a temporary folder and moved into place only
when every file is written, so a failure never leaves half a result behind.
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

import numpy as np
import torch
import torch.nn as nn

from monai_unireg import io, spatial
from monai_unireg.data import pair_name
from monai_unireg.metrics import HD95Metric, JacobianMetric, LabelDiceMetric
from monai_unireg.spatial import spacing_from_affine
from monai_unireg.transforms import CTWindow, MRIPercentile, detect_modality
from monai_unireg.validation import check_labels, check_option
from monai_unireg.visualize import save_overview

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
]

MODALITIES = ("auto", "ct", "mri")
Log = Callable[[str], None]


@dataclass
class LoadedPair:
    """A pair on the fixed grid: images ``[1, 1, *S]`` float32 (original intensities), labels ``[1, 1, *S]``."""

    fixed: torch.Tensor
    moving: torch.Tensor
    affine: np.ndarray
    fixed_label: torch.Tensor | None = None
    moving_label: torch.Tensor | None = None
    moving_resampled: bool = False

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


def read_volume(path: str | os.PathLike, name: str) -> tuple[torch.Tensor, np.ndarray]:
    """``[1, 1, X, Y, Z]`` tensor and affine of a 3D NIfTI file (a trailing singleton 4th axis is dropped)."""
    try:
        array, affine = io.load_nifti(path)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume, got shape {array.shape} in {str(path)!r}.")
    if min(array.shape) < 2:
        raise ValueError(f"{name} must have at least 2 voxels along every axis, got shape {array.shape}.")
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
    and its label are resampled onto the fixed grid in physical space (trilinear for the image, artefact-free
    one-hot sampling for the label; zero outside the moving field of view), so the identity field means
    "same physical point" and the result is right for images straight from a scanner.

    Raises:
        ValueError: naming the argument, for missing or unreadable files, non-3D volumes, NaN/Inf values,
            non-integer or empty labels, or a label not on its image's grid.
    """
    fixed_image, fixed_affine = read_volume(fixed, "fixed")
    moving_image, moving_affine = read_volume(moving, "moving")
    fixed_shape, moving_shape = tuple(fixed_image.shape[2:]), tuple(moving_image.shape[2:])
    labels = {
        "fixed_label": None
        if fixed_label is None
        else _read_label(fixed_label, "fixed_label", fixed_shape, fixed_affine),
        "moving_label": None
        if moving_label is None
        else _read_label(moving_label, "moving_label", moving_shape, moving_affine),
    }
    fixed_image, moving_image = fixed_image.to(torch.float32), moving_image.to(torch.float32)
    resample = moving_shape != fixed_shape or not np.allclose(moving_affine, fixed_affine, atol=1e-3)
    if resample:
        moving_image = spatial.resample_to_grid(moving_image, moving_affine, fixed_affine, fixed_shape)
        if labels["moving_label"] is not None:
            labels["moving_label"] = spatial.resample_to_grid(
                labels["moving_label"], moving_affine, fixed_affine, fixed_shape, is_label=True
            )
    return LoadedPair(fixed_image, moving_image, fixed_affine, moving_resampled=resample, **labels)


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
    check_option(modality, "modality", ("ct", "mri"))
    low, high = output_range
    if modality == "ct":
        transform = CTWindow(a_min=ct_window[0], a_max=ct_window[1], b_min=low, b_max=high)
    else:
        transform = MRIPercentile(b_min=low, b_max=high)
    return torch.as_tensor(transform(image[0]))[None]


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
    ddf = ddf.detach().to("cpu", torch.float32)
    warped = spatial.warp(pair.moving, ddf, padding_mode="zeros")
    warped_label = (
        None if pair.moving_label is None else spatial.warp_labels(pair.moving_label, ddf, padding_mode="zeros")
    )
    return RegistrationResult(ddf, warped, warped_label, runtime, resolved)


def evaluate_result(pair: LoadedPair, result: RegistrationResult, labels: Sequence[int] | None = None) -> dict:
    """Metrics of one registration: SDlogJ (Learn2Reg "+3"), % folding, runtime and, with both labels,
    Dice and HD95 (mm) per label with their means (labels absent from both maps are left out).

    Args:
        labels: label values to evaluate; ``None`` takes the non-zero labels of the fixed label map.
    """
    # this pair's values (the call), not aggregate(): that gathers across torch.distributed ranks, which register
    # other pairs (multi_gpu_evaluate.yaml)
    sdlogj, folding = JacobianMetric()(result.ddf)[0].tolist()
    metrics: dict = {
        "sdlogj": sdlogj,
        "folding_percent": folding,
        "runtime_s": result.runtime_s,
        "modality": result.modality,
        "moving_resampled_to_fixed_grid": pair.moving_resampled,
    }
    if pair.fixed_label is None or result.warped_label is None:
        return metrics
    dice_metric = LabelDiceMetric(labels=labels)
    dice = dice_metric(result.warped_label, pair.fixed_label)[0]
    hd95 = HD95Metric(labels=dice_metric.label_values, spacing=pair.spacing)(result.warped_label, pair.fixed_label)[0]
    label_values = [int(v) for v in dice_metric.label_values]
    metrics["dice"] = {str(v): _finite_or_none(d) for v, d in zip(label_values, dice.tolist())}
    metrics["hd95_mm"] = {str(v): _finite_or_none(h) for v, h in zip(label_values, hd95.tolist())}
    metrics["dice_mean"] = _finite_or_none(float(torch.nanmean(dice)))
    metrics["hd95_mm_mean"] = _finite_or_none(float(torch.nanmean(hd95)))
    return metrics


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in values)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_results(
    out_dir: str | os.PathLike, pair: LoadedPair, result: RegistrationResult, metrics: dict
) -> list[Path]:
    """Write the result files into ``out_dir`` (staged in a temporary folder, then moved into place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        io.save_nifti(result.warped[0, 0], pair.affine, staging / "warped.nii.gz")
        if result.warped_label is not None:
            io.save_nifti(result.warped_label[0, 0].to(torch.int16), pair.affine, staging / "warped_label.nii.gz")
        io.save_ddf(result.ddf, pair.affine, staging / "ddf.nii.gz")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_overview(
            staging / "overview.png",
            pair.fixed,
            pair.moving,
            result.warped,
            result.ddf[0],
            fixed_label=pair.fixed_label,
            moving_label=pair.moving_label,
            warped_label=result.warped_label,
            spacing=pair.spacing,
            title=_overview_title(metrics),
        )
        written = []
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _overview_title(metrics: dict) -> str:
    parts = [f"SDlogJ {metrics['sdlogj']:.3f}", f"folding {metrics['folding_percent']:.2f} %"]
    if metrics.get("dice_mean") is not None:
        parts.insert(0, f"mean Dice {metrics['dice_mean']:.3f}")
    return ", ".join(parts) + f", {metrics['runtime_s']:.2f} s"


NetworkOrFactory = nn.Module | Callable[[tuple[int, ...]], nn.Module]


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
) -> dict:
    """Register one pair of files and write every result file to ``out_dir``; returns the metrics.

    Args:
        network: a registration module, or a function of the fixed grid's spatial shape returning one
            (for methods whose configuration depends on the volume size).
        intensity_range: range the images are normalised to for the network ([0, 1]; UniReg: [-1, 1]).
    """
    check_option(modality, "modality", MODALITIES)
    log(f"[1/4] reading {fixed} and {moving}")
    pair = read_pair(fixed, moving, fixed_label, moving_label)
    if not isinstance(network, nn.Module):
        network = network(tuple(pair.fixed.shape[2:]))
    if pair.moving_resampled:
        log("      moving image resampled onto the fixed grid (physical space)")
    grid = f"grid {tuple(pair.fixed.shape[2:])}, spacing {_rounded(pair.spacing)} mm"
    log(f"[2/4] registering on {resolve_device(device)} ({grid})")
    result = register_pair(network, pair, modality, device, ct_window, intensity_range)
    log(f"      {result.runtime_s:.2f} s ({result.modality.upper()} intensities)")
    log("[3/4] evaluating")
    metrics = evaluate_result(pair, result, labels)
    if "dice_mean" in metrics:
        log(f"      mean Dice {metrics['dice_mean']:.4f}, mean HD95 {metrics['hd95_mm_mean']:.2f} mm")
    log(f"      SDlogJ {metrics['sdlogj']:.4f}, folding {metrics['folding_percent']:.3f} %")
    log(f"[4/4] writing results to {out_dir}")
    write_results(out_dir, pair, result, metrics)
    return metrics


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
