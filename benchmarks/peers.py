"""Deformable registration side by side: VoxelOpt against ANTs SyN, Greedy, FireANTs, elastix B-spline and ConvexAdam.

Cases (``--cases``; data from ``../shared/data``, beside the checkout):

- ``brainsynth``: BrainSynth ``registration_val`` (first ``--pairs``; affinely pre-aligned, so only deformable stages
  run). Dice is the mean over the dataset's ``dice_top30_labels`` (the 30 largest brain structures), HD95 (mm) over
  the same labels; the table shows the means over the pairs.
- Known-field cases: an image against itself warped by a smooth random diffeomorphism, so the true field is known.
  With ``v`` Gaussian-smoothed white noise (seeded, sigma 6 voxels, max |v| 4 voxels), the moving image (and
  labels) are the fixed ones warped by ``exp(-v)`` (trilinear, border padding; labels one-hot); the registration
  field to recover is ``u = exp(v)`` (``warp(moving, u) = fixed``). EPE = mean over the object mask of
  ``|ddf - u|`` in mm. The floor of that construction, ``|compose(exp(-v), exp(v))|`` (should be 0), is printed
  with the mean and max of ``|u|``.

  - ``vxm2mm``: BrainVXM2mm (80x96x112, 2 mm); object = brain (fixed label > 0); Dice over ``evaluation_labels``.
  - ``vxm2mm-8bit`` / ``vxm1mm-8bit``: the same construction on 8-bit copies of BrainVXM2mm / BrainVXM1mm
    (160x192x224, 1 mm): intensities rounded to 256 levels evenly spaced over the image's [min, max], voxels that
    were exactly 0 kept at exactly 0; the moving image is quantised again onto the same levels after warping, so
    both images are 8-bit as a user's pair would be (the fraction of fixed voxels the rounding changed is printed;
    BrainVXM1mm is already k/255, so its copy differs only by the re-spacing over [0, 0.976]).
  - ``ct``: CTTotalSeg case 0001 (122x101x30, 3 mm) in HU with the air around the body kept (the moving image is
    rounded back to integer HU); object = the body (largest connected component of HU > -500, holes filled per
    axial slice, so the lungs count as inside); Dice over ``evaluation_labels`` (TotalSegmentator predictions).
    The dataset's other "pair" is not used: case 0002 is the same scan (case 0001 is exactly its slices 82-111,
    same world frame), so once brought onto the fixed grid the pair is an identity, and case 0002 has no labels.

  "bg |u|" is the mean |ddf| (mm) over the flat background of the fixed image: exact zeros outside the labels
  (brains), air (HU < -900) outside the body (CT). It is not an error (the true field of a known case is not zero
  there; its mean over that region is printed with the case); it shows what a method does where the images hold
  no information: it should stay small and close to the identity's 0.

Scores (the same code for every method): the moving labels are warped with ``spatial.warp_labels`` (one-hot,
trilinear majority) using the method's field; SDlogJ (Learn2Reg "+3" convention) and % folding from our Jacobian
metric (2-voxel border crop). Every case is also scored with the zero field ("identity", the affine starting
point) in the parent process; ">=id" says whether a run is never worse than that on its pair: Dice >= the
identity's (labelled cases) and EPE <= the identity's (known-field cases).

Every method returns a field in our convention (``[1, 3, D, H, W]`` voxels of the fixed grid, ``warped(x) =
moving(x + ddf(x))``).

Conversion of the peers' fields, and how it is verified: ANTs' forward warp (``fwdtransforms``, an ITK displacement
field, LPS mm, fixed grid) is read with ``monai_unireg.io.load_ddf``; Greedy's warp (``-o``, written to a NIfTI file
as its CLI does) is read with ``load_ddf`` too: although its documentation (``docs/reference.rst``, "-o") words it
as ``ras(A) + warp[A] = ras(B)``, the file holds ITK's LPS mm displacements on the fixed grid (read as LPS it
reproduces Greedy's own reslicing to ~1e-6, read as RAS it misses by ~0.6 on [0, 1] images); FireANTs'
``save_as_ants_transforms`` writes an ITK displacement field (LPS mm, fixed grid), read with ``load_ddf``; elastix's
B-spline transform is exported as a dense field with ``itk.transformix_deformation_field`` (LPS mm, fixed grid) and
converted with ``spatial.ddf_mm_to_voxel``; ConvexAdam returns ``[D, H, W, 3]`` voxel displacements in array-axis
order, pull-back (``convexAdam.apply_convex`` samples ``moving`` at ``x + disp(x)``), i.e. already our convention.
For every run, the peer's own linear resampling of the moving image (``ants.apply_transforms``, Greedy's reslice
mode ``-rf -rm -r``, FireANTs' ``evaluate``, elastix's result image, ``apply_convex``) is compared with
``spatial.warp(moving, ddf, padding_mode="zeros")`` at the voxels whose sample point lies at least one voxel inside
the grid (the borders differ by padding rule only); ``--check-conventions`` turns a difference above
``CONVENTION_TOLERANCE`` times the moving image's intensity range into a failure (exit status 1).

What is timed (wall clock, ``time.perf_counter``), per method and pair, with the inputs already in memory:
VoxelOpt: the network call ``network(moving, fixed)``, features included (the intensity normalisation of
``monai-unireg register`` is done before, untimed, as there); ANTs: ``ants.registration`` (it writes its transforms
to the work folder and resamples the moving image once, as part of the call); Greedy: the registration
``Greedy3D.execute`` call (images passed in memory, warp written uncompressed to the work folder); FireANTs: building
``GreedyRegistration`` and ``optimize()``; elastix: ``itk.elastix_registration_method`` (which also resamples the
moving image once); ConvexAdam: ``convex_adam_pt``. Not timed: imports, reading the NIfTI files, exporting/reading
the dense field, the peers' own resampling for the convention check and the scoring.

Whole processes (``--process``): each tool as a user runs it, on one pair (the first pair of ``--process-case``, by
default of the first of ``--cases``), in a fresh process started by this script, from start-up and imports to the
written outputs: ours ``python -m monai_unireg register --fixed F --moving M --out DIR --device cpu`` (what the
``monai-unireg`` console script runs: reads, resamples if needed, registers, evaluates the Jacobian, writes the
warped image and field); ANTs: no ``antsRegistration`` binary comes with ANTsPy, so a ``python -c`` that reads the
pair, runs ``ants.registration(type_of_transform="SyNOnly")`` (which writes the transforms) and writes the warped
image; Greedy: picsl-greedy ships no ``greedy`` binary (only the Python extension), so a ``python -c`` running the
two CLI command strings a user would run (registration ``-i F M -o warp.nii.gz`` with the settings below but
greedy's default ``-wp 0.1``, then reslicing ``-rf F -rm M warped.nii.gz -r warp.nii.gz``) through
``Greedy3D.execute``; FireANTs: a ``python -c`` loading the pair, registering, writing the ANTs-format warp and the
moved image. Each runs under a small launcher (``LAUNCHER``, as ``/usr/bin/time -v`` would: forked from this script,
the tool's ``ru_maxrss`` would start at this script's RSS), which measures the tool's own process with ``os.wait4``:
wall time, CPU time (user + system) and peak RSS (``ru_maxrss``); the 1/5/15-minute load averages
(``os.getloadavg``, as ``uptime`` prints them) before and after each run are printed beside the times.
``--process-repeats N`` runs the tools in turn N times (median reported).

Memory (per-method runs): each method runs on each pair in its own child process (``multiprocessing`` spawn).
Just before the timed block the child resets its peak resident set size (``echo 5 > /proc/self/clear_refs``, Linux
>= 4.0) and reads its current RSS; after it, ``VmHWM`` from ``/proc/self/status``. "peak MiB" is that peak RSS of
the whole process during registration (libraries and inputs included), "+MiB" the rise over the RSS just before
it. Both are CPU memory (everything runs on the CPU). The child's CPU time over the block is kept too (``cpu_s``),
to show the thread limit held: ``--threads`` sets ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and ``torch.set_num_threads`` in every child (and the environment of every
``--process`` child), and Greedy's ``-threads``. ``--timeout`` bounds each child, its start-up and imports
included. The methods take turns pair by pair, so a busy machine slows them alike; still, compare wall times only
from a quiet machine (``cpu s`` moves less with the load; the load average is printed with every run).

Method settings:

- ``ants-synonly``: ``ants.registration(type_of_transform="SyNOnly")`` defaults (Mattes MI 32 bins, SyN[0.2, 3,
  0], iterations 40x20x0 at shrink 4x2x1: the full-resolution level is skipped).
- ``ants-synonly-fine``: the same with ``reg_iterations=(100, 70, 50, 20)`` (shrink 8x4x2x1, smoothing 3x2x1x0
  voxels: runs at full resolution).
- ``greedy``: picsl-greedy 1.4.0.3, ``-d 3 -m NCC 2x2x2 -n 100x50x10 -threads N -wp 0``, everything else at
  Greedy's defaults (``-s 1.732vox 0.7071vox``, step ``-e 1.0``, ``-tscale SCALE``, pure greedy updates, NCC noise
  0.001, double precision). Sources: Greedy documentation, ``docs/reference.rst`` (defaults: "-s ... Default:
  1.732vox, 0.7071vox", "matches the default in SyN"; ``-n`` 3 levels 4x/2x/1x; NCC radius 2x2x2 = 5^3 patch)
  and ``docs/quick_start.rst`` (deformable brain MRI example with ``-n 100x50x10`` and a 2x2x2 NCC patch radius;
  pyushkevich/greedy repository, greedy.readthedocs.io). ``-wp 0`` only turns off the 0.1-voxel rounding of the
  saved warp (default ``-wp 0.1``), so that the field we score is the one Greedy computed; it does not change the
  registration. No ``-ia``/``-it``: the pairs share one world frame and are pre-aligned.
- ``greedy-sv``: the quick start's deformable command as written there: ``-m WNCC 2x2x2 -sv -n 100x50x10``
  (weighted NCC and the stationary-velocity / log-Demons mode, "almost always worth it" per the quick start), with
  the same ``-threads N -wp 0``. Reported beside ``greedy``; the targets use ``greedy``.
- ``fireants``: fireants 1.5.0 on the CPU, ``GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 25],
  cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1, optimizer="adam", optimizer_lr=0.5)``
  (the rest at the class defaults: loss ``"cc"``, ``smooth_warp_sigma=0.5``, tolerance 1e-6 over 10 iterations),
  exactly the deformable step of the documentation's brain-MRI quick start (rohitrango/FireANTs
  ``docs/docs/quickstart.md``, "Deformable Registration"), without its affine initialisation (pre-aligned pairs).
  float32; no fused CUDA ops on the CPU. It fails on volumes with an axis under 32 voxels (the CT case, 30 slices):
  ``GreedyRegistration.optimize`` sizes every level to at least ``MIN_IMG_SIZE = 32`` voxels per axis, the full
  level included, so the moved image (32 slices) no longer matches the fixed one (30) in the CC loss
  ("ValueError: ground truth has differing shape"); recorded as a failure, not worked around.
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
- ``voxelopt``: the network exactly as ``monai-unireg register`` builds and feeds it: the network from
  ``monai_unireg.cli.METHODS["voxelopt"]`` for the fixed grid's shape (whatever that currently is: today VoxelOpt
  on the pair downsampled by 2 + refinement, ``refined_voxelopt``'s defaults), on images normalised as ``register``
  does (``detect_modality``: CT by ``METHOD_DEFAULTS["voxelopt"].ct_window``, MRI by [min, 99th percentile], to its
  ``intensity_range``).
- ``voxelopt-paper``: plain ``VoxelOpt()`` (the paper's defaults: 5 levels, MIND-SSC radius 2 / dilation 2) on the
  same normalised images; on a volume too small for 5 levels (CT, 30 slices) the deepest pyramid that fits.
- ``voxelopt-refined``: "VoxelOpt + refinement" (ours, beyond the paper): ``engines.refinement.refined_voxelopt``
  with the register VoxelOpt settings ``CLI_VOXELOPT`` at full resolution (on the input grid, ``finest_level=0``)
  followed by the continuous refinement ``CLI_REFINEMENT`` (multi-resolution Adam on the field), same normalised
  inputs; the whole network call is timed.
- ``voxelopt-half-refined``: the same with VoxelOpt's features on the input grid and its finest optimised level at
  half resolution (``finest_level=1``, the authors' pyramid placement; the register default before it ran on the
  downsampled pair).
- ``identity``: zero field (the affine starting point), for reference.

Targets (PASS/FAIL lines and a summary at the end for each of ``CANDIDATES`` that ran, against the same peers; N/A
where a contender did not run): VoxelOpt never worse than
identity on any pair; on every known-field case EPE <= ANTs SyNOnly default and <= Greedy; on every labelled case
(the BrainSynth mean and each known-field case) mean Dice >= the best of ANTs SyNOnly default, Greedy and FireANTs;
with ``--process``, the whole ``monai-unireg register`` process <= 0.5x the ANTs SyNOnly process and <= the Greedy
process on the same pair (same threads). The in-process registration time ratio to ANTs is printed too.

Run (in the peers' environment, see benchmarks/README.md)::

    python benchmarks/peers.py [--cases brainsynth vxm2mm ...] [--methods voxelopt ants-synonly greedy ...]
                               [--pairs 10] [--threads 2] [--check-conventions] [--process [--process-only]]
                               [--out results.json|results.csv]
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
import statistics
import subprocess
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
#: Levels of the 8-bit copies.
QUANTISATION_LEVELS = 256
#: CT body: largest connected component above this (HU), holes filled per axial slice.
CT_BODY_HU = -500.0
#: CT flat background: air below this (HU) outside the body.
CT_AIR_HU = -900.0
#: Largest |ours - peer's own resampling|, as a fraction of the moving image's intensity range, accepted by
#: ``--check-conventions``.
CONVENTION_TOLERANCE = 1e-3
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)
BASELINE = "ants-synonly"
GREEDY = "greedy"
FIREANTS = "fireants"
CANDIDATE = "voxelopt"
#: Our contenders the targets are checked for, each against the same peers (those of them in ``--methods``).
CANDIDATES = ("voxelopt", "voxelopt-refined", "voxelopt-half-refined")
#: Peers the targets compare VoxelOpt with: EPE on known-field cases, Dice on labelled cases.
EPE_PEERS = (BASELINE, GREEDY)
DICE_PEERS = (BASELINE, GREEDY, FIREANTS)
#: Greedy deformable settings (module docstring); ``-threads`` and ``-wp 0`` are added by the runner.
GREEDY_SETTINGS = "-m NCC 2x2x2 -n 100x50x10"
GREEDY_SV_SETTINGS = "-m WNCC 2x2x2 -sv -n 100x50x10"
#: FireANTs deformable settings (module docstring: its brain-MRI quick start).
FIREANTS_SETTINGS: dict[str, object] = {
    "scales": [4, 2, 1],
    "iterations": [200, 100, 25],
    "cc_kernel_size": 5,
    "deformation_type": "compositive",
    "smooth_grad_sigma": 1,
    "optimizer": "adam",
    "optimizer_lr": 0.5,
}


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


def load_text() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return "load " + " ".join(f"{value:.2f}" for value in os.getloadavg())


class Meter:
    """Context manager timing one block and measuring the process's peak RSS during it (module docstring)."""

    def __init__(self) -> None:
        self.seconds = math.nan
        self.cpu_seconds = math.nan
        self.rss_before_mib = math.nan
        self.peak_rss_mib = math.nan
        self.peak_was_reset = False
        self.load_before = (math.nan,) * 3

    def __enter__(self) -> Meter:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.peak_was_reset = True
        except OSError:
            self.peak_was_reset = False
        self.rss_before_mib = _status_mib("VmRSS")
        self.load_before = os.getloadavg()
        self._cpu_start = _cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = _cpu_seconds() - self._cpu_start
        self.peak_rss_mib = _status_mib("VmHWM")

    def stats(self) -> dict[str, float | bool]:
        """The measurements, as stored per run (``time_s``, ``cpu_s``, ``peak_rss_mib``, ``rss_rise_mib``, load)."""
        return {
            "time_s": self.seconds,
            "cpu_s": self.cpu_seconds,
            "peak_rss_mib": self.peak_rss_mib,
            "rss_rise_mib": self.peak_rss_mib - self.rss_before_mib,
            "peak_was_reset": self.peak_was_reset,
            "load_1min": self.load_before[0],
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


def _load_field_on_fixed_grid(path: Path, fixed_path: Path, peer: str) -> torch.Tensor:
    """An ITK displacement field file (LPS mm) read with ``load_ddf``, after checking it lies on the fixed grid."""
    ddf, field_affine = load_ddf(path)
    _, fixed_affine = load_nifti(fixed_path)
    if not np.allclose(field_affine, fixed_affine, atol=1e-3):
        raise RuntimeError(f"{peer} warp is not on the fixed grid: affine {field_affine} vs {fixed_affine}")
    return ddf


def _threads() -> int:
    return int(os.environ["OMP_NUM_THREADS"])


def run_identity(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """Zero field: the (affine) starting point."""
    fixed = _image_tensor(fixed_path)
    with meter:
        ddf = torch.zeros(1, 3, *fixed.shape[2:])
    return RunnerOutput(ddf)


def _normalised_pair(fixed_path: Path, moving_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair normalised as ``monai-unireg register`` normalises it for VoxelOpt (modality detected per image)."""
    from monai_unireg.engines import METHOD_DEFAULTS
    from monai_unireg.engines.pair_registration import detect_modality, normalise_intensity

    defaults = METHOD_DEFAULTS["voxelopt"]

    images = []
    for path in (fixed_path, moving_path):
        image = _image_tensor(path)
        images.append(normalise_intensity(image, detect_modality(image), defaults.ct_window, defaults.intensity_range))
    return images[0], images[1]


def run_voxelopt(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """VoxelOpt exactly as ``monai-unireg register`` builds and feeds it; times the forward pass."""
    from monai_unireg.cli import METHODS as CLI_METHODS

    fixed, moving = _normalised_pair(fixed_path, moving_path)
    model = CLI_METHODS["voxelopt"](tuple(fixed.shape[2:])).eval()
    with meter, torch.no_grad():
        ddf = model(moving, fixed)
    return RunnerOutput(ddf.float())


def _run_refined(fixed_path: Path, moving_path: Path, meter: Meter, finest_level: int) -> RunnerOutput:
    from monai_unireg.engines.refinement import CLI_VOXELOPT, refined_voxelopt

    fixed, moving = _normalised_pair(fixed_path, moving_path)
    voxelopt = {**CLI_VOXELOPT, "finest_level": finest_level}
    model = refined_voxelopt(tuple(fixed.shape[2:]), voxelopt=voxelopt, voxelopt_factor=1).eval()
    with meter:
        ddf = model(moving, fixed)
    return RunnerOutput(ddf.float())


def run_voxelopt_refined(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ "VoxelOpt + refinement" (``engines.refinement.refined_voxelopt``: the register VoxelOpt, then
    ``CLI_REFINEMENT``), same normalised inputs; times the whole network call (VoxelOpt, features and refinement)."""
    return _run_refined(fixed_path, moving_path, meter, finest_level=0)


def run_voxelopt_half_refined(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """The same with VoxelOpt's finest optimised level at half resolution (``finest_level=1``)."""
    return _run_refined(fixed_path, moving_path, meter, finest_level=1)


def run_voxelopt_paper(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """Plain ``VoxelOpt()`` (paper defaults; fewer levels only where 5 do not fit), same normalised inputs."""
    from monai_unireg.networks.nets import VoxelOpt

    fixed, moving = _normalised_pair(fixed_path, moving_path)
    shape = tuple(fixed.shape[2:])
    model = VoxelOpt()
    if min(shape) // 2 ** (model.num_levels - 1) < 2:
        model = VoxelOpt(num_levels=VoxelOpt.levels_for(shape, coarsest=2, maximum=model.num_levels))
    model = model.eval()
    with meter, torch.no_grad():
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
    ddf = _load_field_on_fixed_grid(Path(warps[0]), fixed_path, "ANTs")
    peer_warped = ants.apply_transforms(fixed, moving, transforms, interpolator="linear").numpy()
    return RunnerOutput(ddf, peer_warped)


def run_ants_synonly(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ANTs ``SyNOnly`` with the package defaults."""
    return _run_ants(fixed_path, moving_path, workdir, meter)


def run_ants_synonly_fine(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """ANTs ``SyNOnly`` with ``reg_iterations=(100, 70, 50, 20)`` (four levels, full resolution included)."""
    return _run_ants(fixed_path, moving_path, workdir, meter, reg_iterations=(100, 70, 50, 20))


def _run_greedy(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter, settings: str) -> RunnerOutput:
    """Greedy deformable registration (``settings``), images in memory, warp written as its CLI writes it.

    The warp file is an ITK displacement field (LPS mm, fixed grid) despite the documentation's RAS wording: read
    with ``load_ddf``, it reproduces Greedy's own reslicing to ~1e-6 (the convention check), the RAS reading does
    not (~0.6 on [0, 1] images). Written uncompressed (``.nii``) so that the timed block spends no time in gzip.
    """
    import SimpleITK as sitk
    from picsl_greedy import Greedy3D

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    warp_path = workdir / "greedy_warp.nii"
    threads = f"-d 3 -threads {_threads()}"
    greedy = Greedy3D()
    with meter:
        greedy.execute(f"{threads} {settings} -wp 0 -i fixed moving -o {warp_path}", fixed=fixed, moving=moving)
    ddf = _load_field_on_fixed_grid(warp_path, fixed_path, "Greedy")
    greedy.execute(f"{threads} -rf fixed -rm moving resliced -r {warp_path}", fixed=fixed, moving=moving, resliced=None)
    peer_warped = sitk.GetArrayFromImage(greedy["resliced"]).transpose(2, 1, 0)
    return RunnerOutput(ddf, peer_warped)


def run_greedy(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """Greedy with ``GREEDY_SETTINGS`` (NCC 2x2x2, 100x50x10, default smoothing)."""
    return _run_greedy(fixed_path, moving_path, workdir, meter, GREEDY_SETTINGS)


def run_greedy_sv(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """Greedy with ``GREEDY_SV_SETTINGS`` (the quick start's WNCC 2x2x2, -sv, 100x50x10)."""
    return _run_greedy(fixed_path, moving_path, workdir, meter, GREEDY_SV_SETTINGS)


def run_fireants(fixed_path: Path, moving_path: Path, workdir: Path, meter: Meter) -> RunnerOutput:
    """FireANTs ``GreedyRegistration`` (``FIREANTS_SETTINGS``) on the CPU; warp saved in ANTs format."""
    import logging

    from fireants.io import BatchedImages, Image
    from fireants.registration.greedy import GreedyRegistration

    logging.getLogger("fireants").setLevel(logging.ERROR)
    fixed = BatchedImages([Image.load_file(str(fixed_path), device="cpu")])
    moving = BatchedImages([Image.load_file(str(moving_path), device="cpu")])
    with meter:
        registration = GreedyRegistration(fixed_images=fixed, moving_images=moving, **FIREANTS_SETTINGS)
        registration.optimize()
    warp_path = workdir / "fireants_warp.nii.gz"
    registration.save_as_ants_transforms(str(warp_path))
    ddf = _load_field_on_fixed_grid(warp_path, fixed_path, "FireANTs")
    with torch.no_grad():
        # FireANTs arrays are SimpleITK's [z, y, x]: back to the NIfTI (i, j, k) order.
        peer_warped = registration.evaluate(fixed, moving)[0, 0].numpy().transpose(2, 1, 0)
    return RunnerOutput(ddf, peer_warped)


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
    "voxelopt": Method(run_voxelopt, "monai_unireg.networks.nets:VoxelOpt", "VoxelOpt (register)"),
    "voxelopt-paper": Method(run_voxelopt_paper, "monai_unireg.networks.nets:VoxelOpt", "VoxelOpt (paper)"),
    "voxelopt-refined": Method(
        run_voxelopt_refined, "monai_unireg.engines.refinement:refined_voxelopt", "VoxelOpt + refinement"
    ),
    "voxelopt-half-refined": Method(
        run_voxelopt_half_refined, "monai_unireg.engines.refinement:refined_voxelopt", "VoxelOpt half + refinement"
    ),
    "ants-synonly": Method(run_ants_synonly, "ants", "ANTs SyNOnly default"),
    "ants-synonly-fine": Method(run_ants_synonly_fine, "ants", "ANTs SyNOnly 100x70x50x20"),
    "greedy": Method(run_greedy, "picsl_greedy:Greedy3D", "Greedy NCC 2x2x2"),
    "greedy-sv": Method(run_greedy_sv, "picsl_greedy:Greedy3D", "Greedy WNCC -sv"),
    "fireants": Method(run_fireants, "fireants.registration.greedy:GreedyRegistration", "FireANTs greedy"),
    "elastix-bspline": Method(run_elastix_bspline, "itk:elastix_registration_method", "elastix B-spline"),
    "convexadam": Method(run_convexadam, "convexAdam.convex_adam_MIND", "ConvexAdam (MIND)"),
}
#: Methods run when ``--methods`` is not given (``voxelopt-paper``, ``voxelopt-half-refined`` and ``greedy-sv``
#: only on request).
DEFAULT_METHODS = [m for m in METHODS if m not in ("voxelopt-paper", "voxelopt-half-refined", "greedy-sv")]


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
    """Child-process entry: run one method on one pair; write ``result.npz``, ``stats.json`` and the method's own
    output (``log.txt``) to ``workdir``."""
    out = Path(workdir)
    os.chdir(out)  # some peers write side files into the working directory
    # The peers' own progress output (Greedy prints every iteration) goes to a log file beside the results.
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(out / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
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
# Cases


@dataclass
class Case:
    """One registration pair; ``true_ddf`` (voxels, our convention) is set for the known-field cases.

    ``group`` is what the table aggregates over (``"brainsynth"``: the mean over its pairs; otherwise the case
    itself); ``object_mask`` / ``background_mask`` are boolean ``[D, H, W]`` masks of the fixed grid (EPE inside the
    object, mean |field| over the flat background); ``identity`` holds the zero field's scores.
    """

    name: str
    key: str
    group: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    dice_labels: tuple[int, ...]
    object_mask: torch.Tensor
    background_mask: torch.Tensor | None = None
    true_ddf: torch.Tensor | None = None
    notes: dict[str, float] = field(default_factory=dict)
    identity: dict[str, float] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return self.name.replace(" ", "_").replace("<-", "-")


def _label_path(image: Path) -> Path:
    return Path(str(image).replace("/imagesTr/", "/labelsTr/"))


def _dataset(name: str) -> tuple[Path, dict]:
    folder = DATA / name
    return folder, json.loads((folder / f"{name}_dataset.json").read_text())


def brainsynth_cases(count: int) -> list[Case]:
    """The first ``count`` BrainSynth ``registration_val`` pairs, scored on ``dice_top30_labels``."""
    folder, meta = _dataset("BrainSynth")
    cases = []
    for entry in meta["registration_val"][:count]:
        fixed, moving = (folder / entry["fixed"]).resolve(), (folder / entry["moving"]).resolve()
        name = f"BrainSynth {fixed.name[11:15]}<-{moving.name[11:15]}"
        labels = tuple(meta["dice_top30_labels"])
        fixed_labels = torch.from_numpy(np.asarray(load_nifti(_label_path(fixed))[0]) > 0)
        flat = torch.from_numpy(np.asarray(load_nifti(fixed)[0]) == 0) & ~fixed_labels
        cases.append(
            Case(
                name,
                "brainsynth",
                "brainsynth",
                fixed,
                moving,
                _label_path(fixed),
                _label_path(moving),
                labels,
                fixed_labels,
                flat,
            )
        )
    return cases


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    half = int(math.ceil(3 * sigma))
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def quantise(image: torch.Tensor, low: float, high: float, levels: int = QUANTISATION_LEVELS) -> torch.Tensor:
    """``image`` rounded to ``levels`` values evenly spaced over ``[low, high]``; exact zeros stay exactly 0."""
    step = (high - low) / (levels - 1)
    rounded = torch.round((image.clamp(low, high) - low) / step) * step + low
    return torch.where(image == 0, torch.zeros_like(image), rounded).to(image.dtype)


def _known_case(
    key: str,
    name: str,
    workdir: Path,
    image: torch.Tensor,
    affine: np.ndarray,
    labels_path: Path,
    dice_labels: tuple[int, ...],
    object_mask: torch.Tensor,
    background_mask: torch.Tensor | None,
    fixed_path: Path | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    notes: dict[str, float] | None = None,
    seed: int = KNOWN_SEED,
) -> Case:
    """``image`` (``[1, 1, *S]``) against itself warped by ``exp(-v)``; true field ``exp(v)`` (module docstring).

    The fixed image is written to ``workdir`` unless ``fixed_path`` (its file) is given; ``finish`` maps the warped
    moving image to how it is stored (8-bit rounding, integer HU).
    """
    labels, _ = load_nifti(labels_path)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))[None, None]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, *image.shape[2:], generator=generator, dtype=torch.float64)
    velocity = separable_filter(noise, _gaussian_kernel(KNOWN_SIGMA_VOXELS), 3)
    velocity = (velocity * (KNOWN_MAX_VOXELS / velocity.norm(dim=1).max())).to(torch.float32)
    true_ddf = spatial.integrate_velocity(velocity)
    inverse = spatial.integrate_velocity(-velocity)
    del noise, velocity

    if fixed_path is None:
        fixed_path = workdir / f"{key}_fixed.nii.gz"
        save_nifti(image[0, 0], affine, fixed_path)
    moving = spatial.warp(image, inverse)
    moving = finish(moving) if finish is not None else moving
    moving_path, moving_labels_path = workdir / f"{key}_moving.nii.gz", workdir / f"{key}_moving_labels.nii.gz"
    save_nifti(moving[0, 0], affine, moving_path)
    save_nifti(spatial.warp_labels(labels_t, inverse)[0, 0].to(torch.int16), affine, moving_labels_path)
    floor = _mm_norm(spatial.compose(inverse, true_ddf), affine)
    true_mm = _mm_norm(true_ddf, affine)
    notes = dict(notes or {})
    notes.update(
        true_mean_mm=float(true_mm[object_mask].mean()),
        true_max_mm=float(true_mm[object_mask].max()),
        floor_mm=float(floor[object_mask].mean()),
    )
    if background_mask is not None and bool(background_mask.any()):
        notes["true_bg_mean_mm"] = float(true_mm[background_mask].mean())
    return Case(
        name,
        key,
        key,
        fixed_path,
        moving_path,
        labels_path.resolve(),
        moving_labels_path,
        dice_labels,
        object_mask,
        background_mask,
        true_ddf,
        notes,
    )


def _vxm_case(workdir: Path, dataset: str, key: str, eight_bit: bool) -> Case:
    """A BrainVXM known-field case (brain = label > 0; flat background = exact zeros outside it), optionally 8-bit."""
    folder, meta = _dataset(dataset)
    image_path = (folder / meta["training"][0]["image"]).resolve()
    labels_path = (folder / meta["training"][0]["label"]).resolve()
    array, affine = load_nifti(image_path)
    image = torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]
    brain = torch.from_numpy(np.asarray(load_nifti(labels_path)[0]) > 0)
    fixed_path, finish, notes = image_path, None, {}
    if eight_bit:
        low, high = float(image.min()), float(image.max())
        quantised = quantise(image, low, high)
        notes["rounded_fraction"] = float((quantised != image).float().mean())
        image, fixed_path = quantised, None
        finish = lambda moving: quantise(moving, low, high)  # noqa: E731
    flat = (image[0, 0] == 0) & ~brain
    name = f"{dataset} {'8-bit ' if eight_bit else ''}known field"
    return _known_case(
        key,
        name,
        workdir,
        image,
        affine,
        labels_path,
        tuple(meta["evaluation_labels"]),
        brain,
        flat,
        fixed_path=fixed_path,
        finish=finish,
        notes=notes,
    )


def ct_body_mask(hu: np.ndarray) -> np.ndarray:
    """The body of a CT (HU, axis 2 axial): the largest connected component above ``CT_BODY_HU``, holes filled in
    each axial slice (lungs and bowel gas count as inside)."""
    from scipy import ndimage

    components, count = ndimage.label(hu > CT_BODY_HU)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    body = components == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return body


def ct_case(workdir: Path) -> Case:
    """CTTotalSeg case 0001 (HU, air kept) against itself warped by a known field; object = the body."""
    folder, meta = _dataset("CTTotalSeg")
    entry = next(e for e in meta["training"] if "label" in e)
    image_path, labels_path = (folder / entry["image"]).resolve(), (folder / entry["label"]).resolve()
    array, affine = load_nifti(image_path)
    hu = np.asarray(array, dtype=np.float32)
    body = ct_body_mask(hu)
    air = (hu < CT_AIR_HU) & ~body
    image = torch.from_numpy(hu)[None, None]
    return _known_case(
        "ct",
        f"CTTotalSeg {image_path.name[11:15]} known field",
        workdir,
        image,
        affine,
        labels_path,
        tuple(meta["evaluation_labels"]),
        torch.from_numpy(body),
        torch.from_numpy(air),
        fixed_path=image_path,
        finish=lambda moving: torch.round(moving).to(torch.int16),
        notes={"body_fraction": float(body.mean()), "air_fraction": float(air.mean())},
    )


#: ``--cases`` keys: a description and a builder ``(workdir, args) -> cases``.
CASES: dict[str, tuple[str, Callable[[Path, argparse.Namespace], list[Case]]]] = {
    "brainsynth": ("BrainSynth registration_val, first --pairs", lambda w, a: brainsynth_cases(a.pairs)),
    "vxm2mm": ("BrainVXM2mm known field", lambda w, a: [_vxm_case(w, "BrainVXM2mm", "vxm2mm", False)]),
    "vxm2mm-8bit": ("8-bit BrainVXM2mm known field", lambda w, a: [_vxm_case(w, "BrainVXM2mm", "vxm2mm-8bit", True)]),
    "vxm1mm-8bit": ("8-bit BrainVXM1mm known field", lambda w, a: [_vxm_case(w, "BrainVXM1mm", "vxm1mm-8bit", True)]),
    "ct": ("CTTotalSeg 0001 known field (HU)", lambda w, a: [ct_case(w)]),
}


# ----------------------------------------------------------------------------------------------------------------
# Scoring (the same for every method)


def _mm_norm(ddf: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """``[D, H, W]`` length in mm of a ``[1, 3, D, H, W]`` voxel field on the grid of ``affine``."""
    return spatial.ddf_voxel_to_mm(ddf.to(torch.float64), torch.from_numpy(affine))[0].norm(dim=0)


def _label_tensor(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    array, affine = load_nifti(path)
    return torch.from_numpy(np.asarray(array, dtype=np.int64))[None, None], affine


def score(case: Case, ddf: torch.Tensor) -> dict[str, float]:
    """Dice, HD95 (mm), SDlogJ, % folding, mean |ddf| (mm) over the flat background and (known field) EPE (mm)."""
    fixed_labels, affine = _label_tensor(case.fixed_labels)
    moving_labels, _ = _label_tensor(case.moving_labels)
    warped_labels = spatial.warp_labels(moving_labels, ddf)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LabelDiceMetric: labels present in neither")
        warnings.filterwarnings("ignore", message="HD95Metric: labels present in only one")
        dice = LabelDiceMetric(labels=case.dice_labels)(warped_labels, fixed_labels)
        hd95 = HD95Metric(labels=case.dice_labels, spacing=spacing_from_affine(affine).tolist())(
            warped_labels, fixed_labels
        )
    sdlogj, folding = JacobianMetric()(ddf)[0].tolist()
    result = {"dice": float(dice.nanmean()), "hd95_mm": float(hd95.nanmean()), "sdlogj": sdlogj, "folding_pct": folding}
    length = _mm_norm(ddf, affine)
    if case.background_mask is not None and bool(case.background_mask.any()):
        result["bg_mm"] = float(length[case.background_mask].mean())
    if case.true_ddf is not None:
        result["epe_mm"] = float(_mm_norm(ddf - case.true_ddf, affine)[case.object_mask].mean())
    return result


def not_worse_than_identity(case: Case, scores: dict[str, float]) -> bool:
    """Dice >= the zero field's and (known field) EPE <= the zero field's, on this case."""
    ok = scores["dice"] >= case.identity["dice"] - 1e-9
    if "epe_mm" in scores:
        ok = ok and scores["epe_mm"] <= case.identity["epe_mm"] + 1e-9
    return ok


def convention_agreement(case: Case, ddf: torch.Tensor, peer_warped: np.ndarray) -> dict[str, float]:
    """``spatial.warp(moving, ddf)`` against the peer's own resampling, at points >= 1 voxel inside the grid.

    Returns the max and mean absolute difference, the moving image's intensity range (the tolerance scales with
    it), the number of voxels compared and, for scale, the mean absolute change the peer's resampling made to the
    moving image there (a check on a zero field would prove nothing).
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
        "range": float(moving.max() - moving.min()),
        "voxels": int(inside.sum()),
        "moved_mean_abs": float((peer - moving[0, 0])[inside].abs().mean()),
    }


def convention_ok(agreement: dict[str, float]) -> bool:
    """Within ``CONVENTION_TOLERANCE`` of the moving image's intensity range."""
    return agreement["max_abs"] <= CONVENTION_TOLERANCE * max(agreement["range"], 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Whole processes (--process): each tool as a user runs it, measured with os.wait4


ANTS_PROCESS = """
import sys, ants
fixed, moving, out = sys.argv[1:4]
f, m = ants.image_read(fixed), ants.image_read(moving)
result = ants.registration(f, m, type_of_transform="SyNOnly", outprefix=out + "/ants_")
ants.image_write(result["warpedmovout"], out + "/warped.nii.gz")
"""
GREEDY_PROCESS = """
import sys
from picsl_greedy import Greedy3D
fixed, moving, out, threads, settings = sys.argv[1:6]
greedy = Greedy3D()
greedy.execute(f"-d 3 -threads {threads} {settings} -i {fixed} {moving} -o {out}/warp.nii.gz")
greedy.execute(f"-d 3 -threads {threads} -rf {fixed} -rm {moving} {out}/warped.nii.gz -r {out}/warp.nii.gz")
"""
FIREANTS_PROCESS = """
import json, sys, torch
from fireants.io import BatchedImages, Image
from fireants.registration.greedy import GreedyRegistration
fixed, moving, out, threads, settings = sys.argv[1:6]
torch.set_num_threads(int(threads))
f = BatchedImages([Image.load_file(fixed, device="cpu")])
m = BatchedImages([Image.load_file(moving, device="cpu")])
registration = GreedyRegistration(fixed_images=f, moving_images=m, **json.loads(settings))
registration.optimize()
registration.save_as_ants_transforms(out + "/warp.nii.gz")
registration.save_moved_images(registration.evaluate(f, m), out + "/warped.nii.gz")
"""
REFINED_PROCESS = """
import sys
from pathlib import Path
from monai_unireg.cli import _log
from monai_unireg.engines import METHOD_DEFAULTS, register_files
from monai_unireg.engines.refinement import CLI_VOXELOPT, refined_voxelopt
fixed, moving, out, finest = sys.argv[1:5]
voxelopt = {**CLI_VOXELOPT, "finest_level": int(finest)}
network = lambda shape: refined_voxelopt(shape, voxelopt=voxelopt, voxelopt_factor=1)
register_files(network, Path(fixed), Path(moving), Path(out), device="cpu",
               ct_window=METHOD_DEFAULTS["voxelopt"].ct_window,
               intensity_range=METHOD_DEFAULTS["voxelopt"].intensity_range, log=_log)
"""
#: Tools ``--process`` can time (those of them in ``--methods`` are timed). ``voxelopt`` is ``monai-unireg register``
#: itself (today VoxelOpt on the pair downsampled by 2 + refinement); the
#: refined variants' process is ``REFINED_PROCESS``, a ``python -c`` doing what ``register`` does (``register_files``
#: with VoxelOpt's CT window and intensity range) with the chosen start.
PROCESS_TOOLS = ("voxelopt", "voxelopt-refined", "voxelopt-half-refined", BASELINE, GREEDY, FIREANTS)


def process_command(tool: str, fixed: Path, moving: Path, out: Path, threads: int) -> list[str]:
    """The command line a user would run for ``tool`` on the pair, writing into ``out`` (module docstring)."""
    python = sys.executable
    if tool == "voxelopt":
        return [
            python,
            "-m",
            "monai_unireg",
            "register",
            "--fixed",
            str(fixed),
            "--moving",
            str(moving),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    if tool in ("voxelopt-refined", "voxelopt-half-refined"):
        finest = "1" if tool == "voxelopt-half-refined" else "0"
        return [python, "-c", REFINED_PROCESS, str(fixed), str(moving), str(out), finest]
    if tool == BASELINE:
        return [python, "-c", ANTS_PROCESS, str(fixed), str(moving), str(out)]
    if tool == GREEDY:
        return [python, "-c", GREEDY_PROCESS, str(fixed), str(moving), str(out), str(threads), GREEDY_SETTINGS]
    if tool == FIREANTS:
        return [
            python,
            "-c",
            FIREANTS_PROCESS,
            str(fixed),
            str(moving),
            str(out),
            str(threads),
            json.dumps(FIREANTS_SETTINGS),
        ]
    raise ValueError(f"no whole-process command for {tool!r}")


#: Started (small) between this script and each measured tool: on Linux a child's ``ru_maxrss`` starts from the
#: RSS of the process it was forked from, so forking the tool from this script (which holds the cases) would report
#: at least this script's RSS. The launcher forks the tool, waits for it with ``os.wait4`` and writes the tool's
#: own wall time, CPU time and peak RSS as JSON to the file named by its first argument.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
child.returncode = os.waitstatus_to_exitcode(status)
cpu = usage.ru_utime + usage.ru_stime
record = {"wall_s": wall, "cpu_s": cpu, "maxrss_kib": usage.ru_maxrss, "exit_code": child.returncode}
with open(sys.argv[1], "w") as handle:
    json.dump(record, handle)
sys.exit(0 if child.returncode == 0 else 1)
"""


def time_process(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, object]:
    """Run ``command`` through ``LAUNCHER``: its wall time, CPU time and peak RSS (``os.wait4`` on the tool's own
    process), and the load averages before and after."""
    load_before = os.getloadavg()
    measured = log_path.with_suffix(".json")
    measured.unlink(missing_ok=True)
    with log_path.open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(measured), *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            start_new_session=True,  # its own process group, so that a timeout ends the tool too
        )
        timed_out = False
        try:
            launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(launcher.pid, 9)
            launcher.wait()
    record: dict[str, object] = {"wall_s": math.nan, "cpu_s": math.nan, "peak_rss_mib": math.nan}
    if measured.exists():
        values = json.loads(measured.read_text())
        record.update(wall_s=values["wall_s"], cpu_s=values["cpu_s"], peak_rss_mib=values["maxrss_kib"] / 1024.0)
        record["exit_code"] = values["exit_code"]
    else:
        record["exit_code"] = None
        lines = log_path.read_text(errors="replace").strip().splitlines()
        record["error"] = f"timed out after {timeout:.0f} s" if timed_out else (lines[-1] if lines else "no record")
    record["load_before"], record["load_after"] = list(load_before), list(os.getloadavg())
    if record["exit_code"] not in (0, None):
        lines = log_path.read_text(errors="replace").strip().splitlines()
        record["error"] = lines[-1] if lines else f"exit {record['exit_code']}"
    return record


def run_processes(
    case: Case, tools: list[str], workdir: Path, threads: int, repeats: int, timeout: float
) -> dict[str, dict[str, object]]:
    """Each tool's whole process on ``case``, in turn, ``repeats`` times; medians per tool (and every run)."""
    env = dict(os.environ)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    runs: dict[str, list[dict[str, object]]] = {tool: [] for tool in tools}
    print(f"\nwhole processes on {case.name} ({threads} threads); {load_text()}", flush=True)
    for repeat in range(repeats):
        for tool in tools:
            out = workdir / "process" / f"{tool}_{repeat}"
            out.mkdir(parents=True, exist_ok=True)
            command = process_command(tool, case.fixed_image, case.moving_image, out, threads)
            record = time_process(command, env, out / "log.txt", timeout)
            runs[tool].append(record)
            status = f"FAILED: {record['error']}" if "error" in record else "ok"
            before = " ".join(f"{v:.2f}" for v in record["load_before"])
            after = " ".join(f"{v:.2f}" for v in record["load_after"])
            print(
                f"  {tool:<14} wall {record['wall_s']:7.1f} s  cpu {record['cpu_s']:7.1f} s  peak "
                f"{record['peak_rss_mib']:6.0f} MiB  (load before {before}, after {after})  {status}",
                flush=True,
            )
    result = {}
    for tool, records in runs.items():
        ok = [r for r in records if "error" not in r]
        result[tool] = {
            "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else math.nan,
            "cpu_s": statistics.median(r["cpu_s"] for r in ok) if ok else math.nan,
            "peak_rss_mib": max((r["peak_rss_mib"] for r in ok), default=math.nan),
            "runs": records,
            "command": " ".join(process_command(tool, case.fixed_image, case.moving_image, Path("OUT"), threads)[:6]),
        }
    return result


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run_one(method: str, case: Case, workdir: Path, threads: int, timeout: float) -> dict[str, object]:
    """Run ``method`` on ``case`` in a child process and score it; a failure is recorded, not raised."""
    out = workdir / case.slug / method
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"method": method, "pair": case.name, "case": case.key, "group": case.group}
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
    record["not_worse_than_identity"] = not_worse_than_identity(case, record)
    if peer_warped is not None:
        record["convention"] = convention_agreement(case, ddf, peer_warped)
    return record


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


SCORE_KEYS = ("dice", "hd95_mm", "epe_mm", "bg_mm", "sdlogj", "folding_pct", "time_s", "cpu_s")


def group_label(group: str, cases: list[Case]) -> str:
    """The table's name of a group: ``BrainSynth (N pairs)`` or the case's name."""
    members = [case for case in cases if case.group == group]
    if group == "brainsynth":
        return f"BrainSynth mean ({len(members)} pairs)"
    return members[0].name


def summarise(runs: list[dict[str, object]], methods: list[str], cases: list[Case]) -> list[dict[str, object]]:
    """One row per (group, method): means over the group's pairs (BrainSynth) or the case's values; the
    ``identity`` reference row (scored in the parent) first in each group, unless ``identity`` itself ran."""
    rows = []
    groups = list(dict.fromkeys(case.group for case in cases))
    for group in groups:
        members = [case for case in cases if case.group == group]
        if "identity" not in methods:
            reference = {key: _mean([case.identity.get(key, math.nan) for case in members]) for key in SCORE_KEYS}
            rows.append(
                {
                    "group": group,
                    "case": group_label(group, cases),
                    "method": "identity",
                    **reference,
                    "peak_rss_mib": math.nan,
                    "rss_rise_mib": math.nan,
                    "pairs": len(members),
                    "failures": 0,
                    "not_worse_than_identity": True,
                    "reference_only": True,
                }
            )
        for method in methods:
            mine = [r for r in runs if r["method"] == method and r["group"] == group]
            ok = [r for r in mine if "error" not in r]
            row: dict[str, object] = {"group": group, "case": group_label(group, cases), "method": method}
            row.update({key: _mean([r.get(key, math.nan) for r in ok]) for key in SCORE_KEYS})
            row["peak_rss_mib"] = max([r["peak_rss_mib"] for r in ok], default=math.nan)
            row["rss_rise_mib"] = max([r["rss_rise_mib"] for r in ok], default=math.nan)
            row["pairs"], row["failures"] = len(ok), len(mine) - len(ok)
            row["not_worse_than_identity"] = all(r["not_worse_than_identity"] for r in ok) if ok else None
            rows.append(row)
    return rows


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


def _verdict(value: float, reference: float, relation: str) -> str:
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return "N/A"
    return "PASS" if (value >= reference if relation == "ge" else value <= reference) else "FAIL"


def target_checks(
    runs: list[dict[str, object]],
    rows: list[dict[str, object]],
    processes: dict[str, dict[str, object]] | None,
    contender: str = CANDIDATE,
) -> list[dict[str, object]]:
    """The VoxelOpt targets (module docstring) for ``contender``; ``N/A`` where it or the reference did not
    run."""
    checks: list[dict[str, object]] = []

    def add(text: str, value: float, reference: float, relation: str, note: str = "") -> None:
        checks.append(
            {
                "target": text,
                "value": value,
                "reference": reference,
                "relation": relation,
                "verdict": _verdict(value, reference, relation),
                "note": note,
            }
        )

    mine = [r for r in runs if r["method"] == contender]
    if mine:
        ok = [r for r in mine if "error" not in r]
        worse = [r["pair"] for r in ok if not r["not_worse_than_identity"]]
        failed = len(mine) - len(ok)
        add(
            "never worse than identity (pairs worse or failed)",
            float(len(worse) + failed),
            0.0,
            "le",
            ", ".join(worse) + (f" {failed} failed" if failed else ""),
        )
    by_key = {(row["group"], row["method"]): row for row in rows}
    for group in dict.fromkeys(row["group"] for row in rows):
        candidate = by_key.get((group, contender))
        if candidate is None or not candidate["pairs"]:
            continue
        label = candidate["case"]
        if not math.isnan(candidate["epe_mm"]):
            for peer in EPE_PEERS:
                reference = by_key.get((group, peer))
                value = reference["epe_mm"] if reference is not None and reference["pairs"] else math.nan
                add(f"{label}: EPE <= {METHODS[peer].label}", candidate["epe_mm"], value, "le")
        peers = {p: by_key[(group, p)]["dice"] for p in DICE_PEERS if by_key.get((group, p), {}).get("pairs")}
        best = max(peers, key=peers.get) if peers else None
        missing = [METHODS[p].label for p in DICE_PEERS if p not in peers]
        note = f"best: {METHODS[best].label}" if best else ""
        if missing:
            note += ("; " if note else "") + "no result: " + ", ".join(missing)
        add(f"{label}: Dice >= best peer", candidate["dice"], peers[best] if best else math.nan, "ge", note)
    add(
        f"registration call wall time / {METHODS[BASELINE].label} <= 0.5 (in-process, same pairs)",
        paired_time_ratio(runs, contender, BASELINE),
        0.5,
        "le",
    )
    if processes:
        ours = processes.get(contender, {}).get("wall_s", math.nan)
        for peer, limit in ((BASELINE, 0.5), (GREEDY, 1.0)):
            theirs = processes.get(peer, {}).get("wall_s", math.nan)
            ratio = ours / theirs if theirs and not math.isnan(theirs) else math.nan
            add(
                f"whole process / {METHODS[peer].label} process <= {limit}",
                ratio,
                limit,
                "le",
                f"{_fmt(ours, 1)} s vs {_fmt(theirs, 1)} s",
            )
    return checks


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_progress(record: dict[str, object]) -> None:
    """One line per finished run."""
    if "error" in record:
        print(f"  {record['pair']:<30} {record['method']:<17} FAILED: {record['error']}", flush=True)
        return
    epe = f" EPE {record['epe_mm']:.3f} mm" if "epe_mm" in record else ""
    background = f" bg {record['bg_mm']:.2f} mm" if "bg_mm" in record else ""
    worse = "" if record["not_worse_than_identity"] else "  WORSE THAN IDENTITY"
    print(
        f"  {record['pair']:<30} {record['method']:<17} Dice {record['dice']:.3f} HD95 {record['hd95_mm']:.2f}"
        f" SDlogJ {record['sdlogj']:.3f} fold {record['folding_pct']:.3f}%{epe}{background}  {record['time_s']:.1f} s"
        f" (cpu {record['cpu_s']:.1f} s, load {record['load_1min']:.2f}) peak {record['peak_rss_mib']:.0f} MiB"
        f"{worse}",
        flush=True,
    )


TABLE_COLUMNS = (
    ("Dice", "dice", 3),
    ("HD95 mm", "hd95_mm", 2),
    ("EPE mm", "epe_mm", 3),
    ("bg|u|mm", "bg_mm", 3),
    ("SDlogJ", "sdlogj", 3),
    ("fold %", "folding_pct", 3),
    ("wall s", "time_s", 1),
    ("cpu s", "cpu_s", 1),
    ("peak MiB", "peak_rss_mib", 0),
    ("+MiB", "rss_rise_mib", 0),
)


def print_table(rows: list[dict[str, object]]) -> None:
    """One block per group, one row per method (identity first), with the ">= id" check column."""
    width = max(len(METHODS[row["method"]].label) for row in rows) + 2
    header = f"{'method':<{width}}" + "".join(f"{title:>9}" for title, _, _ in TABLE_COLUMNS) + "  >=id  ok/failed"
    current = None
    for row in rows:
        if row["group"] != current:
            current = row["group"]
            print(f"\n{row['case']}\n{header}")
        cells = "".join(f"{_fmt(row[key], digits):>9}" for _, key, digits in TABLE_COLUMNS)
        check = {True: "yes", False: "NO", None: "-"}[row["not_worse_than_identity"]]
        if row.get("reference_only"):
            check, counts = "ref", "(zero field)"
        else:
            counts = f"{row['pairs']}/{row['failures']}"
        print(f"{METHODS[row['method']].label:<{width}}{cells}  {check:>4}  {counts}")


def print_conventions(runs: list[dict[str, object]]) -> list[str]:
    """Print the peers' field-conversion agreement; return the runs above the tolerance."""
    checked = [r for r in runs if "convention" in r]
    if not checked:
        return []
    print(
        f"\nfield conventions: spatial.warp with the converted field vs the peer's own resampling "
        f"(tolerance {CONVENTION_TOLERANCE} x the moving image's range)"
    )
    failed = []
    for run in checked:
        agreement = run["convention"]
        ok = convention_ok(agreement)
        if not ok:
            failed.append(f"{run['method']} on {run['pair']}")
        print(
            f"  {run['method']:<17} {run['pair']:<30} max |diff| {agreement['max_abs']:.1e} "
            f"mean {agreement['mean_abs']:.1e} (range {agreement['range']:.3g}, image change "
            f"{agreement['moved_mean_abs']:.1e}, {agreement['voxels']} voxels) {'ok' if ok else 'MISMATCH'}"
        )
    return failed


def print_summary(
    runs: list[dict[str, object]],
    rows: list[dict[str, object]],
    processes: dict[str, dict[str, object]] | None,
    targets: list[dict[str, object]],
    candidate: str = CANDIDATE,
) -> None:
    """The compact end summary for ``candidate``: its ratios to the peers, then the targets' PASS/FAIL lines."""
    name = METHODS[candidate].label
    ran = {r["method"] for r in runs if "error" not in r}
    print(f"\nsummary for {name} ({load_text()})")
    if candidate in ran:
        for peer in (BASELINE, GREEDY, FIREANTS):
            if peer in ran:
                print(
                    f"  {name} / {METHODS[peer].label}: registration call wall time "
                    f"{_fmt(paired_time_ratio(runs, candidate, peer), 2)}x (same pairs)"
                )
    if processes and candidate in processes:
        ours = processes[candidate]
        for peer in (BASELINE, GREEDY, FIREANTS):
            if peer in processes:
                theirs = processes[peer]
                wall = ours["wall_s"] / theirs["wall_s"] if theirs["wall_s"] else math.nan
                memory = ours["peak_rss_mib"] / theirs["peak_rss_mib"] if theirs["peak_rss_mib"] else math.nan
                print(
                    f"  {name} process / {METHODS[peer].label} whole process: wall {_fmt(wall, 2)}x "
                    f"({_fmt(ours['wall_s'], 1)} s vs {_fmt(theirs['wall_s'], 1)} s), peak RSS {_fmt(memory, 2)}x"
                )
    for target in targets:
        note = f"  [{target['note']}]" if target["note"] else ""
        sign = ">=" if target["relation"] == "ge" else "<="
        print(
            f"  {target['verdict']:>4}  {name} {target['target']}: {_fmt(target['value'], 3)} {sign} "
            f"{_fmt(target['reference'], 3)}{note}"
        )


def _json_ready(value: object) -> object:
    """``value`` with NaN floats replaced by None (strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_output(
    path: Path,
    config: dict[str, object],
    runs: list[dict[str, object]],
    rows: list[dict[str, object]],
    targets: list[dict[str, object]],
    processes: dict[str, dict[str, object]] | None,
) -> None:
    """``.json``: configuration, every run, the table rows, the processes and the targets; ``.csv``: one row per
    run."""
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
        payload = {"config": config, "runs": runs, "table": rows, "processes": processes, "targets": targets}
        path.write_text(json.dumps(_json_ready(payload), indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=DEFAULT_METHODS,
        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="cases: " + "; ".join(f"{key}: {text}" for key, (text, _) in CASES.items()) + " (default: all)",
    )
    parser.add_argument("--pairs", type=int, default=10, help="BrainSynth registration_val pairs to use (first N)")
    parser.add_argument("--threads", type=int, default=2, help="threads per method (torch, ITK, OpenMP, Greedy)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per method and pair")
    parser.add_argument(
        "--check-conventions",
        action="store_true",
        help=f"exit 1 when a peer's converted field disagrees with its own resampling by > {CONVENTION_TOLERANCE} "
        "x the moving image's range",
    )
    parser.add_argument(
        "--process",
        action="store_true",
        help=f"also time the whole process of each of {', '.join(PROCESS_TOOLS)} in --methods on one pair",
    )
    parser.add_argument("--process-only", action="store_true", help="only the --process timing (implies --process)")
    parser.add_argument("--process-case", choices=list(CASES), help="case of the --process pair (default: first)")
    parser.add_argument("--process-repeats", type=int, default=1, help="--process rounds (median reported)")
    parser.add_argument("--out", type=Path, help="write results to this .json or .csv file")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.process = args.process or args.process_only
    if args.pairs < 0 or args.threads < 1 or args.process_repeats < 1:
        parser.error("--pairs must be >= 0, --threads and --process-repeats >= 1")
    if args.out is not None and args.out.suffix not in (".json", ".csv"):
        parser.error("--out must end in .json or .csv")
    if args.process_case is not None and args.process_case not in args.cases:
        args.cases = [*args.cases, args.process_case]
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
    print(f"{len(args.methods)} methods, cases {' '.join(args.cases)}, {args.threads} threads, CPU; {load_text()}")

    processes = None
    with tempfile.TemporaryDirectory(prefix="peers_") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        cases = [case for key in args.cases for case in CASES[key][1](workdir, args)]
        for case in cases:
            case.identity = score(case, torch.zeros(1, 3, *case.object_mask.shape))
            if case.notes:
                notes = ", ".join(f"{key} {value:.3f}" for key, value in case.notes.items())
                print(f"{case.name}: {notes}")
        runs = []
        if not args.process_only:
            for case in cases:
                for method in args.methods:
                    runs.append(run_one(method, case, workdir, args.threads, args.timeout))
                    print_progress(runs[-1])
        if args.process:
            tools = [tool for tool in PROCESS_TOOLS if tool in args.methods]
            key = args.process_case or args.cases[0]
            pair = next(case for case in cases if case.key == key)
            processes = run_processes(pair, tools, workdir, args.threads, args.process_repeats, args.timeout)

    rows = summarise(runs, args.methods, cases) if runs else []
    if rows:
        print(
            "\nDice: BrainSynth over dice_top30_labels, the known-field cases over each dataset's evaluation_labels; "
            "HD95 over the same labels; EPE over the object (brain: label > 0; CT: body); bg|u|: mean |field| over "
            "the flat background; wall/cpu s: registration call per pair (mean); memory: worst pair; >=id: never "
            "worse than the zero field on any pair of the group."
        )
        print_table(rows)
    if any(run.get("peak_was_reset") is False for run in runs):
        print("note: /proc/self/clear_refs was not writable, so peak RSS includes the child's start-up")
    failed_conventions = print_conventions(runs)
    ran = {run["method"] for run in runs} | set(processes or {})
    targets = []
    for candidate in [c for c in CANDIDATES if c in ran] or [CANDIDATE]:
        checks = target_checks(runs, rows, processes, candidate)
        print_summary(runs, rows, processes, checks, candidate)
        targets += [{**check, "candidate": candidate} for check in checks]
    if args.out is not None:
        config = {
            "methods": args.methods,
            "cases": args.cases,
            "pairs": [case.name for case in cases],
            "threads": args.threads,
            "case_notes": {case.name: case.notes for case in cases if case.notes},
            "greedy": GREEDY_SETTINGS,
            "greedy_sv": GREEDY_SV_SETTINGS,
            "fireants": FIREANTS_SETTINGS,
        }
        write_output(args.out, config, runs, rows, targets, processes)
        print(f"\nresults written to {args.out}")
    if args.check_conventions and failed_conventions:
        print(f"\nconvention check FAILED for: {', '.join(failed_conventions)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
