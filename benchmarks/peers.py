"""Deformable registration side by side: VoxelOpt against ANTs SyN, elastix B-spline and ConvexAdam.

Pairs (from ``../shared/data``, beside the checkout):

- BrainSynth ``registration_val`` (first ``--pairs``; affinely pre-aligned, so only deformable stages run). Dice is
  the mean over the dataset's ``dice_top30_labels`` (the 30 largest brain structures), HD95 (mm) over the same
  labels; SDlogJ (Learn2Reg "+3" convention) and % folding from our Jacobian metric (2-voxel border crop).
- "known": BrainVXM2mm against itself warped by a smooth random diffeomorphism, so the true field is known. With
  ``v`` Gaussian-smoothed white noise (seeded, sigma 6 voxels, max |v| 4 voxels = 8 mm), the moving image (and
  labels) are the fixed ones warped by ``exp(-v)``; the registration field to recover is ``u = exp(v)``
  (``warp(moving, u) = fixed``). EPE = mean over the brain mask (fixed label > 0) of ``|ddf - u|`` in mm. The
  floor of that construction, ``|compose(exp(-v), exp(v))|`` (should be 0), is printed. Dice over the dataset's
  ``evaluation_labels``.

Every method returns a field in our convention (``[1, 3, D, H, W]`` voxels of the fixed grid, ``warped(x) =
moving(x + ddf(x))``); all methods are scored by the same code: the moving labels are warped with
``spatial.warp_labels`` (one-hot/trilinear majority) using that field.

Conversion of the peers' fields, and how it is verified: ANTs' forward warp (``fwdtransforms``, an ITK
displacement field, LPS mm, fixed grid) is read with ``monai_unireg.io.load_ddf``; elastix's B-spline transform
is exported as a dense field with ``itk.transformix_deformation_field`` (LPS mm, fixed grid) and converted with
``spatial.ddf_mm_to_voxel``; ConvexAdam returns ``[D, H, W, 3]`` voxel displacements in array-axis order,
pull-back (``convexAdam.apply_convex`` samples ``moving`` at ``x + disp(x)``), i.e. already our convention. For
every run, the peer's own linear resampling of the moving image (``ants.apply_transforms``, elastix's result image,
``apply_convex``) is compared with ``spatial.warp(moving, ddf, padding_mode="zeros")`` at the voxels whose sample
point lies at least one voxel inside the grid (the borders differ by padding rule only); ``--check-conventions``
turns a difference above ``CONVENTION_TOLERANCE`` into a failure (exit status 1).

What is timed (wall clock, ``time.perf_counter``), per method and pair, with the inputs already in memory:
VoxelOpt: the network call ``network(moving, fixed)``, features included; ANTs: ``ants.registration`` (it writes
its transforms to the work folder and resamples the moving image once, as part of the call); elastix:
``itk.elastix_registration_method`` (which also resamples the moving image once); ConvexAdam: ``convex_adam_pt``.
Not timed: imports, reading the NIfTI files, exporting/reading the dense field and the scoring.

Memory: each method runs on each pair in its own child process (``multiprocessing`` spawn). Just before the timed
block the child resets its peak resident set size (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads
its current RSS; after it, ``VmHWM`` from ``/proc/self/status``. "peak MiB" is that peak RSS of the whole
process during registration (libraries and inputs included), "+MiB" the rise over the RSS just before it. Both
are CPU memory (everything runs on the CPU). The child's CPU time over the block is kept too (``cpu_s``), to show
the thread limit held: ``--threads`` sets ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and ``torch.set_num_threads`` in every child. ``--timeout`` bounds each
child, its start-up and imports included. The methods take turns pair by pair, so a busy machine slows them
alike; still, compare wall times only from a quiet machine (``cpu s`` moves less with the load).

Method settings:

- ``ants-synonly``: ``ants.registration(type_of_transform="SyNOnly")`` defaults (Mattes MI 32 bins, SyN[0.2, 3,
  0], iterations 40x20x0 at shrink 4x2x1: the full-resolution level is skipped).
- ``ants-synonly-fine``: the same with ``reg_iterations=(100, 70, 50, 20)`` (shrink 8x4x2x1, smoothing 3x2x1x0
  voxels: runs at full resolution).
- ``elastix-bspline``: ``GetDefaultParameterMap("bspline")`` (4 resolutions, Mattes MI + bending energy, adaptive
  stochastic gradient descent, 256 iterations per resolution) with an 8 mm final grid spacing (default 10 mm),
  4096 random samples per iteration (default 2048), a fixed random seed and a linear final resampler (for the
  convention check; it does not change the registration). On BrainSynth 01<-02 the untouched default map gave
  Dice 0.712 in about 15 s, these tweaks 0.735 in about 50 s, a 6 mm grid 0.753 with 0.5 % folding. On 02<-03
  it folds 4 % of the voxels (inferior-anterior, where the FOV cuts the head), with the default 10 mm grid too;
  a bending-energy weight of 50 brings that to 0.8 % at the cost of Dice (0.676). Shown as is. Threads: elastix's
  own ``number_of_threads`` crashes with this multi-metric map (ITKElastix issues #160, #295), so the runner caps
  ITK's global thread pool instead.
- ``convexadam``: ``convex_adam_pt`` with the package's MIND defaults (MIND r1 d2, grid 6, search 4, lambda 1.25,
  80 Adam iterations at grid 2, inverse consistency), float32 on the CPU.
- ``voxelopt``: VoxelOpt on MIND-SSC features exactly as ``monai-unireg register`` builds it
  (``monai_unireg.cli.METHODS["voxelopt"]``: the paper's defaults with Eq. 6's sigma mapping, pyramid depth from
  ``VoxelOpt.levels_for``, MIND radius 1 / dilation 1 for native-resolution scans).
- ``identity``: zero field (the affine starting point), for reference.

Run (in the peers' environment: ``pip install -e ".[peers]"`` beside ``torch==2.13.0``, see benchmarks/README.md)::

    python benchmarks/peers.py [--methods voxelopt ants-synonly ...] [--pairs 10] [--threads 2]
                               [--check-conventions] [--out results.json|results.csv]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from monai_unireg import spatial
from monai_unireg.filtering import separable_filter
from monai_unireg.io import RAS_TO_LPS, load_ddf, load_nifti, save_nifti
from monai_unireg.metrics import HD95Metric, JacobianMetric, LabelDiceMetric
from monai_unireg.spatial import spacing_from_affine

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
KNOWN_SEED = 0
KNOWN_SIGMA_VOXELS = 6.0
KNOWN_MAX_VOXELS = 4.0
#: Largest |ours - peer's own resampling| (intensities in [0, 1]) accepted by ``--check-conventions``.
CONVENTION_TOLERANCE = 1e-3
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)
BASELINE = "ants-synonly"
CANDIDATE = "voxelopt"


# ----------------------------------------------------------------------------------------------------------------
# Measuring a block: wall time, CPU time, peak RSS


def _status_mib(key: str) -> float:
    """A ``kB`` entry of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Context manager timing one block and measuring the process's peak RSS during it (module docstring)."""

    def __init__(self) -> None:
        self.seconds = math.nan
        self.cpu_seconds = math.nan
        self.rss_before_mib = math.nan
        self.peak_rss_mib = math.nan
        self.peak_was_reset = False

    def __enter__(self) -> Meter:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.peak_was_reset = True
        except OSError:
            self.peak_was_reset = False
        self.rss_before_mib = _status_mib("VmRSS")
        self._cpu_start = _cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = _cpu_seconds() - self._cpu_start
        self.peak_rss_mib = _status_mib("VmHWM")

    def stats(self) -> dict[str, float | bool]:
        """The measurements, as stored per run (``time_s``, ``cpu_s``, ``peak_rss_mib``, ``rss_rise_mib``)."""
        return {
            "time_s": self.seconds,
            "cpu_s": self.cpu_seconds,
            "peak_rss_mib": self.peak_rss_mib,
            "rss_rise_mib": self.peak_rss_mib - self.rss_before_mib,
            "peak_was_reset": self.peak_was_reset,
        }


# ----------------------------------------------------------------------------------------------------------------
# Runners: one per method, run in a child process. Each reads the images, times the registration with ``meter``
# and returns the field in our convention plus (peers only) the peer's own resampling of the moving image.


@dataclass
class RunnerOutput:
    """``ddf``: ``[1, 3, D, H, W]`` float32 voxels of the fixed grid; ``peer_warped``: ``[D, H, W]`` or None."""

    ddf: torch.Tensor
    peer_warped: np.ndarray | None = None


def _image_tensor(path: Path) -> torch.Tensor:
    array, _ = load_nifti(path)
    return torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]


def _lps_field_to_ddf(lps_xyz: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """``[D, H, W, 3]`` LPS mm displacement on the grid of NIfTI ``affine`` -> ``[1, 3, D, H, W]`` voxels."""
    lps = torch.from_numpy(np.asarray(lps_xyz, dtype=np.float64)).permute(3, 0, 1, 2)[None]
    return spatial.ddf_mm_to_voxel(lps * RAS_TO_LPS, torch.from_numpy(affine)).to(torch.float32)


def run_identity(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """Zero field: the (affine) starting point."""
    fixed = _image_tensor(fixed_path)
    with meter:
        ddf = torch.zeros(1, 3, *fixed.shape[2:])
    return RunnerOutput(ddf)


def run_voxelopt(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """VoxelOpt (MIND) exactly as ``monai-unireg register`` builds it for the fixed grid; times the forward pass."""
    from monai_unireg.cli import METHODS

    fixed, moving = _image_tensor(fixed_path), _image_tensor(moving_path)
    model = METHODS["voxelopt"](tuple(fixed.shape[2:])).eval()
    with meter:
        ddf = model(moving, fixed)
    return RunnerOutput(ddf.float())


def _run_ants(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter, **settings: object) -> RunnerOutput:
    """``ants.registration(type_of_transform="SyNOnly", **settings)``; its forward warp read with ``load_ddf``."""
    import ants

    fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    with meter:
        result = ants.registration(
            fixed, moving, type_of_transform="SyNOnly", outprefix=str(workdir / "ants_"), **settings
        )
    transforms = list(result["fwdtransforms"])
    warps = [t for t in transforms if t.endswith("Warp.nii.gz")]
    initial = [ants.read_transform(t).parameters for t in transforms if t.endswith("GenericAffine.mat")]
    if len(warps) != 1 or len(warps) + len(initial) != len(transforms):
        raise RuntimeError(f"expected one forward warp field (and the identity initial transform), got {transforms}")
    if any(not np.allclose(p, [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], atol=1e-6) for p in initial):
        raise RuntimeError(f"SyNOnly's initial transform is not the identity: {initial}")
    ddf, field_affine = load_ddf(warps[0])
    _, fixed_affine = load_nifti(fixed_path)
    if not np.allclose(field_affine, fixed_affine, atol=1e-3):
        raise RuntimeError(f"ANTs warp is not on the fixed grid: affine {field_affine} vs {fixed_affine}")
    peer_warped = ants.apply_transforms(fixed, moving, transforms, interpolator="linear").numpy()
    return RunnerOutput(ddf, peer_warped)


def run_ants_synonly(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ANTs ``SyNOnly`` with the package defaults."""
    return _run_ants(fixed_path, moving_path, workdir, meter)


def run_ants_synonly_fine(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ANTs ``SyNOnly`` with ``reg_iterations=(100, 70, 50, 20)`` (four levels, full resolution included)."""
    return _run_ants(fixed_path, moving_path, workdir, meter, reg_iterations=(100, 70, 50, 20))


def _itk_grid_matches(image: object, affine: np.ndarray) -> bool:
    """True when an ITK image's origin/spacing/direction equal the NIfTI ``affine`` (RAS) in ITK's LPS frame."""
    flip = np.diag([-1.0, -1.0, 1.0])
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    linear = np.asarray(image.GetDirection(), dtype=np.float64) @ np.diag(np.asarray(image.GetSpacing()))
    same_origin = np.allclose(origin, flip @ affine[:3, 3], atol=1e-3)
    return same_origin and np.allclose(linear, flip @ affine[:3, :3], atol=1e-5)


def run_elastix_bspline(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """elastix B-spline (default map, tweaks in the module docstring); dense field from transformix."""
    import itk

    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline")
    bspline["FinalGridSpacingInPhysicalUnits"] = ["8.0"]
    bspline["NumberOfSpatialSamples"] = ["4096"]
    bspline["RandomSeed"] = ["121212"]
    bspline["ResampleInterpolator"] = ["FinalLinearInterpolator"]
    parameters.AddParameterMap(bspline)
    # number_of_threads= segfaults with this multi-metric map (ITKElastix #160, #295): cap ITK's pool instead.
    threads = int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"])
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    with meter:
        result, transform = itk.elastix_registration_method(
            fixed, moving, parameter_object=parameters, log_to_console=False
        )
    deformation = itk.transformix_deformation_field(
        moving, transform, output_directory=str(workdir), log_to_console=False
    )
    _, affine = load_nifti(fixed_path)
    if not (_itk_grid_matches(fixed, affine) and _itk_grid_matches(deformation, affine)):
        raise RuntimeError("elastix: the ITK grid of the fixed image or of the field differs from the NIfTI affine")
    # ITK arrays are [z, y, x(, c)]: reverse the spatial axes back to the NIfTI (index i, j, k) order.
    ddf = _lps_field_to_ddf(itk.array_from_image(deformation).transpose(2, 1, 0, 3), affine)
    peer_warped = itk.array_from_image(result).transpose(2, 1, 0)
    return RunnerOutput(ddf, peer_warped)


def run_convexadam(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ConvexAdam (``convex_adam_pt``, MIND defaults, float32 on the CPU)."""
    from convexAdam.apply_convex import apply_convex
    from convexAdam.convex_adam_MIND import convex_adam_pt

    fixed, moving = _image_tensor(fixed_path)[0, 0], _image_tensor(moving_path)[0, 0]
    with meter:
        displacement = convex_adam_pt(fixed, moving, dtype=torch.float32, device=torch.device("cpu"))
    ddf = torch.from_numpy(displacement.astype(np.float32)).permute(3, 0, 1, 2)[None].contiguous()
    peer_warped = apply_convex(displacement, moving.numpy())
    return RunnerOutput(ddf, peer_warped)


Runner = Callable[[Path, Path, Path, Meter], RunnerOutput]


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its runner and what it needs (``module`` or ``module:attribute``)."""

    runner: Runner
    requires: str
    label: str


METHODS: dict[str, Method] = {
    "identity": Method(run_identity, "torch", "identity (affine only)"),
    "voxelopt": Method(run_voxelopt, "monai_unireg.networks.nets:VoxelOpt", "VoxelOpt (MIND)"),
    "ants-synonly": Method(run_ants_synonly, "ants", "ANTs SyNOnly default"),
    "ants-synonly-fine": Method(run_ants_synonly_fine, "ants", "ANTs SyNOnly 100x70x50x20"),
    "elastix-bspline": Method(run_elastix_bspline, "itk:elastix_registration_method", "elastix B-spline"),
    "convexadam": Method(run_convexadam, "convexAdam.convex_adam_MIND", "ConvexAdam (MIND)"),
}


def missing_requirement(requires: str) -> str | None:
    """None when ``requires`` imports (``module:attribute`` imports the module and looks the attribute up)."""
    module, _, attribute = requires.partition(":")
    if not attribute:
        return None if importlib.util.find_spec(module.split(".")[0]) is not None else f"module {module!r} not found"
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        return f"{module}.{attribute} cannot be imported: {error}"
    return None


def _set_thread_environment(threads: int) -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def worker(method: str, fixed_path: str, moving_path: str, workdir: str, threads: int) -> None:
    """Child-process entry: run one method on one pair; write ``result.npz`` and ``stats.json`` to ``workdir``."""
    out = Path(workdir)
    os.chdir(out)  # some peers write side files into the working directory
    try:
        _set_thread_environment(threads)
        torch.set_num_threads(threads)
        meter = Meter()
        output = METHODS[method].runner(Path(fixed_path), Path(moving_path), out, meter)
        arrays = {"ddf": output.ddf.detach().cpu().numpy().astype(np.float32)}
        if output.peer_warped is not None:
            arrays["peer_warped"] = np.asarray(output.peer_warped, dtype=np.float32)
        np.savez(out / "result.npz", **arrays)
        (out / "stats.json").write_text(json.dumps(meter.stats()))
    except BaseException:
        (out / "error.txt").write_text(traceback.format_exc())
        raise


# ----------------------------------------------------------------------------------------------------------------
# Pairs


@dataclass
class Case:
    """One registration pair; ``true_ddf`` (voxels, our convention) is set for the known-field pair."""

    name: str
    group: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    dice_labels: tuple[int, ...]
    true_ddf: torch.Tensor | None = None
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return self.name.replace(" ", "_").replace("<-", "-")


def _label_path(image: Path) -> Path:
    return Path(str(image).replace("/imagesTr/", "/labelsTr/"))


def brainsynth_cases(count: int) -> list[Case]:
    """The first ``count`` BrainSynth ``registration_val`` pairs, scored on ``dice_top30_labels``."""
    folder = DATA / "BrainSynth"
    meta = json.loads((folder / "BrainSynth_dataset.json").read_text())
    cases = []
    for entry in meta["registration_val"][:count]:
        fixed, moving = (folder / entry["fixed"]).resolve(), (folder / entry["moving"]).resolve()
        name = f"BrainSynth {fixed.name[11:15]}<-{moving.name[11:15]}"
        labels = tuple(meta["dice_top30_labels"])
        cases.append(Case(name, "brainsynth", fixed, moving, _label_path(fixed), _label_path(moving), labels))
    return cases


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    half = int(math.ceil(3 * sigma))
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def known_case(workdir: Path, seed: int = KNOWN_SEED) -> Case:
    """BrainVXM2mm against itself warped by ``exp(-v)``; true field ``exp(v)`` (module docstring)."""
    folder = DATA / "BrainVXM2mm"
    meta = json.loads((folder / "BrainVXM2mm_dataset.json").read_text())
    fixed_path = (folder / meta["training"][0]["image"]).resolve()
    labels_path = (folder / meta["training"][0]["label"]).resolve()
    image, affine = load_nifti(fixed_path)
    labels, _ = load_nifti(labels_path)
    image_t = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))[None, None]

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, *image_t.shape[2:], generator=generator, dtype=torch.float64)
    velocity = separable_filter(noise, _gaussian_kernel(KNOWN_SIGMA_VOXELS), 3)
    velocity = (velocity * (KNOWN_MAX_VOXELS / velocity.norm(dim=1).max())).to(torch.float32)
    true_ddf = spatial.integrate_velocity(velocity)
    inverse = spatial.integrate_velocity(-velocity)

    moving_path, moving_labels_path = workdir / "known_moving.nii.gz", workdir / "known_moving_labels.nii.gz"
    save_nifti(spatial.warp(image_t, inverse)[0, 0], affine, moving_path)
    save_nifti(spatial.warp_labels(labels_t, inverse)[0, 0].to(torch.int16), affine, moving_labels_path)
    brain = labels_t[0, 0] > 0
    floor = _mm_norm(spatial.compose(inverse, true_ddf), affine)[brain]
    true_mm = _mm_norm(true_ddf, affine)[brain]
    notes = {
        "true_mean_mm": float(true_mm.mean()),
        "true_max_mm": float(true_mm.max()),
        "floor_mm": float(floor.mean()),
    }
    return Case(
        "BrainVXM2mm known field",
        "known",
        fixed_path,
        moving_path,
        labels_path,
        moving_labels_path,
        tuple(meta["evaluation_labels"]),
        true_ddf,
        notes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Scoring (the same for every method)


def _mm_norm(ddf: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """``[D, H, W]`` length in mm of a ``[1, 3, D, H, W]`` voxel field on the grid of ``affine``."""
    return spatial.ddf_voxel_to_mm(ddf.to(torch.float64), torch.from_numpy(affine))[0].norm(dim=0)


def _label_tensor(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    array, affine = load_nifti(path)
    return torch.from_numpy(np.asarray(array, dtype=np.int64))[None, None], affine


def score(case: Case, ddf: torch.Tensor) -> dict[str, float]:
    """Dice, HD95 (mm), SDlogJ, % folding and (known field only) EPE (mm) of ``ddf`` on ``case``."""
    fixed_labels, affine = _label_tensor(case.fixed_labels)
    moving_labels, _ = _label_tensor(case.moving_labels)
    warped_labels = spatial.warp_labels(moving_labels, ddf)
    dice = LabelDiceMetric(labels=case.dice_labels)(warped_labels, fixed_labels)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HD95Metric: labels present in only one")
        hd95 = HD95Metric(labels=case.dice_labels, spacing=spacing_from_affine(affine).tolist())(
            warped_labels, fixed_labels
        )
    sdlogj, folding = JacobianMetric()(ddf)[0].tolist()
    result = {"dice": float(dice.nanmean()), "hd95_mm": float(hd95.nanmean()), "sdlogj": sdlogj, "folding_pct": folding}
    if case.true_ddf is not None:
        brain = fixed_labels[0, 0] > 0
        result["epe_mm"] = float(_mm_norm(ddf - case.true_ddf, affine)[brain].mean())
    return result


def convention_agreement(case: Case, ddf: torch.Tensor, peer_warped: np.ndarray) -> dict[str, float]:
    """``spatial.warp(moving, ddf)`` against the peer's own resampling, at points >= 1 voxel inside the grid.

    Returns the max and mean absolute difference, the number of voxels compared and, for scale, the mean absolute
    change the peer's resampling made to the moving image there (a check on a zero field would prove nothing).
    """
    moving = _image_tensor(case.moving_image)
    ours = spatial.warp(moving, ddf, padding_mode="zeros")[0, 0]
    peer = torch.from_numpy(peer_warped).to(torch.float32)
    shape = torch.tensor(ddf.shape[2:], dtype=torch.float32).view(3, 1, 1, 1)
    points = spatial.identity_grid(ddf.shape[2:]) + ddf[0]
    inside = ((points >= 1) & (points <= shape - 2)).all(0)
    difference = (ours - peer)[inside].abs()
    return {
        "max_abs": float(difference.max()),
        "mean_abs": float(difference.mean()),
        "voxels": int(inside.sum()),
        "moved_mean_abs": float((peer - moving[0, 0])[inside].abs().mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run_one(method: str, case: Case, workdir: Path, threads: int, timeout: float) -> dict[str, object]:
    """Run ``method`` on ``case`` in a child process and score it; a failure is recorded, not raised."""
    out = workdir / case.slug / method
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"method": method, "pair": case.name, "group": case.group}
    child = multiprocessing.get_context("spawn").Process(
        target=worker, args=(method, str(case.fixed_image), str(case.moving_image), str(out), threads)
    )
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        record["error"] = f"timed out after {timeout:.0f} s"
        return record
    if child.exitcode != 0:
        error = out / "error.txt"
        record["error"] = error.read_text().strip().splitlines()[-1] if error.exists() else f"exit {child.exitcode}"
        return record
    record.update(json.loads((out / "stats.json").read_text()))
    with np.load(out / "result.npz") as arrays:
        ddf = torch.from_numpy(arrays["ddf"])
        peer_warped = arrays["peer_warped"] if "peer_warped" in arrays else None
    record.update(score(case, ddf))
    if peer_warped is not None:
        record["convention"] = convention_agreement(case, ddf, peer_warped)
    return record


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarise(runs: list[dict[str, object]], methods: list[str]) -> dict[str, dict[str, float]]:
    """Per method: BrainSynth means, known-field values, mean time per pair (all pairs), worst memory."""
    summary = {}
    for method in methods:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        synth = [r for r in ok if r["group"] == "brainsynth"]
        known = [r for r in ok if r["group"] == "known"]
        summary[method] = {
            "dice": _mean([r["dice"] for r in synth]),
            "hd95_mm": _mean([r["hd95_mm"] for r in synth]),
            "sdlogj": _mean([r["sdlogj"] for r in synth]),
            "folding_pct": _mean([r["folding_pct"] for r in synth]),
            "known_dice": _mean([r["dice"] for r in known]),
            "epe_mm": _mean([r["epe_mm"] for r in known]),
            "time_s": _mean([r["time_s"] for r in ok]),
            "cpu_s": _mean([r["cpu_s"] for r in ok]),
            "peak_rss_mib": max([r["peak_rss_mib"] for r in ok], default=math.nan),
            "rss_rise_mib": max([r["rss_rise_mib"] for r in ok], default=math.nan),
            "pairs": len(ok),
            "failures": len([r for r in runs if r["method"] == method and "error" in r]),
        }
    return summary


def paired_time_ratio(runs: list[dict[str, object]], method: str, reference: str) -> float:
    """Mean wall time of ``method`` over mean wall time of ``reference``, on the pairs both completed."""
    times = {
        name: {r["pair"]: r["time_s"] for r in runs if r["method"] == name and "error" not in r}
        for name in (method, reference)
    }
    common = sorted(set(times[method]) & set(times[reference]))
    if not common:
        return math.nan
    return float(np.mean([times[method][p] for p in common]) / np.mean([times[reference][p] for p in common]))


def target_checks(runs: list[dict[str, object]], summary: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    """The three VoxelOpt targets against ANTs SyNOnly default (empty unless both ran)."""
    if CANDIDATE not in summary or BASELINE not in summary:
        return []
    candidate, baseline = summary[CANDIDATE], summary[BASELINE]
    checks = [
        ("mean Dice (BrainSynth) >= ANTs SyNOnly default", candidate["dice"], baseline["dice"], "ge"),
        ("EPE (known field) <= ANTs SyNOnly default", candidate["epe_mm"], baseline["epe_mm"], "le"),
        ("wall time / ANTs SyNOnly default <= 0.5", paired_time_ratio(runs, CANDIDATE, BASELINE), 0.5, "le"),
    ]
    results = []
    for text, value, reference, relation in checks:
        if math.isnan(value) or math.isnan(reference):
            verdict = "N/A"
        else:
            verdict = "PASS" if (value >= reference if relation == "ge" else value <= reference) else "FAIL"
        results.append({"target": text, "value": value, "reference": reference, "verdict": verdict})
    return results


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def print_progress(record: dict[str, object]) -> None:
    """One line per finished run."""
    if "error" in record:
        print(f"  {record['pair']:<26} {record['method']:<18} FAILED: {record['error']}", flush=True)
        return
    epe = f" EPE {record['epe_mm']:.3f} mm" if "epe_mm" in record else ""
    print(
        f"  {record['pair']:<26} {record['method']:<18} Dice {record['dice']:.3f} HD95 {record['hd95_mm']:.2f}"
        f" SDlogJ {record['sdlogj']:.3f} fold {record['folding_pct']:.3f}%{epe}  {record['time_s']:.1f} s"
        f" (cpu {record['cpu_s']:.1f} s) peak {record['peak_rss_mib']:.0f} MiB",
        flush=True,
    )


def print_table(summary: dict[str, dict[str, float]]) -> None:
    """One row per method: BrainSynth means, known-field Dice and EPE, time per pair (all pairs), memory."""
    columns = [
        ("Dice", "dice", 3),
        ("HD95 mm", "hd95_mm", 2),
        ("SDlogJ", "sdlogj", 3),
        ("fold %", "folding_pct", 3),
        ("Dice kn", "known_dice", 3),
        ("EPE mm", "epe_mm", 3),
        ("s/pair", "time_s", 1),
        ("cpu s", "cpu_s", 1),
        ("peak MiB", "peak_rss_mib", 0),
        ("+MiB", "rss_rise_mib", 0),
    ]
    width = max(len(METHODS[m].label) for m in summary) + 2
    print(f"{'method':<{width}}" + "".join(f"{title:>9}" for title, _, _ in columns) + "  ok/failed")
    for method, values in summary.items():
        cells = "".join(f"{_fmt(values[key], digits):>9}" for _, key, digits in columns)
        print(f"{METHODS[method].label:<{width}}{cells}  {values['pairs']}/{values['failures']}")


def print_conventions(runs: list[dict[str, object]]) -> list[str]:
    """Print the peers' field-conversion agreement; return the runs above ``CONVENTION_TOLERANCE``."""
    checked = [r for r in runs if "convention" in r]
    if not checked:
        return []
    print("\nfield conventions: spatial.warp with the converted field vs the peer's own resampling")
    failed = []
    for run in checked:
        agreement = run["convention"]
        ok = agreement["max_abs"] <= CONVENTION_TOLERANCE
        if not ok:
            failed.append(f"{run['method']} on {run['pair']}")
        print(
            f"  {run['method']:<18} {run['pair']:<26} max |diff| {agreement['max_abs']:.1e} "
            f"mean {agreement['mean_abs']:.1e} (image change {agreement['moved_mean_abs']:.1e}, "
            f"{agreement['voxels']} voxels) {'ok' if ok else f'MISMATCH (> {CONVENTION_TOLERANCE})'}"
        )
    return failed


def print_targets(
    runs: list[dict[str, object]], summary: dict[str, dict[str, float]], targets: list[dict[str, object]]
) -> None:
    """VoxelOpt / ANTs SyNOnly default ratios and the PASS/FAIL lines."""
    if not targets:
        return
    memory = summary[CANDIDATE]["peak_rss_mib"] / summary[BASELINE]["peak_rss_mib"]
    print(
        f"\nVoxelOpt / ANTs SyNOnly default: wall time {paired_time_ratio(runs, CANDIDATE, BASELINE):.2f}x "
        f"(same pairs), peak RSS {memory:.2f}x"
    )
    for target in targets:
        print(
            f"{target['verdict']:>4}  VoxelOpt {target['target']} "
            f"({_fmt(target['value'], 3)} vs {_fmt(target['reference'], 3)})"
        )


def _json_ready(value: object) -> object:
    """``value`` with NaN floats replaced by None (strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value


def write_output(
    path: Path,
    config: dict[str, object],
    runs: list[dict[str, object]],
    summary: dict[str, dict[str, float]],
    targets: list[dict[str, object]],
) -> None:
    """``.json``: configuration, every run, the summary and the targets; ``.csv``: one row per run."""
    if path.suffix == ".csv":
        keys = sorted({key for run in runs for key in run if key != "convention"})
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys + ["convention_max_abs"])
            writer.writeheader()
            for run in runs:
                row = {key: value for key, value in run.items() if key != "convention"}
                row["convention_max_abs"] = run.get("convention", {}).get("max_abs", "")
                writer.writerow(row)
    else:
        payload = {"config": config, "runs": runs, "summary": summary, "targets": targets}
        path.write_text(json.dumps(_json_ready(payload), indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to run (default: all)"
    )
    parser.add_argument("--pairs", type=int, default=10, help="BrainSynth registration_val pairs to use (first N)")
    parser.add_argument(
        "--known", action=argparse.BooleanOptionalAction, default=True, help="include the known-field pair"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads per method (torch, ITK, OpenMP)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per method and pair")
    parser.add_argument(
        "--check-conventions",
        action="store_true",
        help=f"exit 1 when a peer's converted field disagrees with its own resampling by > {CONVENTION_TOLERANCE}",
    )
    parser.add_argument("--out", type=Path, help="write results to this .json or .csv file")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.pairs < 0 or args.threads < 1:
        parser.error("--pairs must be >= 0 and --threads >= 1")
    if args.out is not None and args.out.suffix not in (".json", ".csv"):
        parser.error("--out must end in .json or .csv")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"data folder {DATA} not found (expected ../shared/data beside the checkout)")
    problems = {m: missing_requirement(METHODS[m].requires) for m in args.methods}
    problems = {m: p for m, p in problems.items() if p}
    if problems:
        lines = "\n".join(f"  {m}: {p}" for m, p in problems.items())
        sys.exit(f"cannot run these methods:\n{lines}\nleave them out with --methods, or install the peers.")
    _set_thread_environment(args.threads)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="peers_") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        cases = brainsynth_cases(args.pairs) + ([known_case(workdir)] if args.known else [])
        for case in cases:
            if case.notes:
                notes = ", ".join(f"{key} {value:.3f}" for key, value in case.notes.items())
                print(f"{case.name}: true field over the brain mask: {notes}")
        runs = []
        for case in cases:
            for method in args.methods:
                runs.append(run_one(method, case, workdir, args.threads, args.timeout))
                print_progress(runs[-1])

    summary = summarise(runs, args.methods)
    synth = sum(case.group == "brainsynth" for case in cases)
    print(
        f"\n{len(cases)} pairs: {synth} BrainSynth (Dice and HD95 over dice_top30_labels, SDlogJ and folding: "
        f"means over them), {len(cases) - synth} known-field BrainVXM2mm ('kn', EPE); time and cpu: mean per pair "
        f"over all pairs; memory: worst pair. {args.threads} threads, CPU."
    )
    print_table(summary)
    if any(run.get("peak_was_reset") is False for run in runs):
        print("note: /proc/self/clear_refs was not writable, so peak RSS includes the child's start-up")
    failed_conventions = print_conventions(runs)
    targets = target_checks(runs, summary)
    print_targets(runs, summary, targets)
    if args.out is not None:
        config = {
            "methods": args.methods,
            "pairs": [case.name for case in cases],
            "threads": args.threads,
            "known_field": next((case.notes for case in cases if case.notes), None),
        }
        write_output(args.out, config, runs, summary, targets)
        print(f"\nresults written to {args.out}")
    if args.check_conventions and failed_conventions:
        print(f"\nconvention check FAILED for: {', '.join(failed_conventions)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
