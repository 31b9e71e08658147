"""VoxelOpt on a GPU at the paper's size: time per pair (features included), peak memory and run-to-run equality.

The paper (Sec. 3.2, Table 2) reports under 1 s per pair on a GPU for 192x160x256 abdomen CT volumes at 2 mm.
This script registers a synthetic pair of that size (a smooth random texture inside an exactly flat zero
background, 8-bit quantised, the moving image warped by a known smooth field) with:

- ``voxelopt-cli``: VoxelOpt exactly as ``monai-unireg register`` builds it (``monai_unireg.cli.METHODS``);
- ``voxelopt-paper``: ``VoxelOpt()`` with the paper's defaults (MIND-SSC radius 2 / dilation 2);
- ``voxelopt-authors``: ``VoxelOpt(**AUTHORS_PYRAMID)``, the authors' pyramid placement.

Each is timed from the two images on the device to the field on the device (``torch.cuda.synchronize``), median of
``--repeats`` runs after one warm-up; peak memory from ``torch.cuda.max_memory_allocated``. The field of two runs
is compared bit for bit (the README's statement on CUDA determinism comes from here), and the GPU field is compared
with the CPU field of the same pair at a small size (``--cpu-size``), since float rounding differs between the two.

Run: ``python benchmarks/voxelopt_gpu.py [--size 192 160 256] [--repeats 5] [--cpu-size 64 64 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.networks.nets import VoxelOpt
from monai_unireg.networks.nets.voxelopt import AUTHORS_PYRAMID


def synthetic_pair(size: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(moving, fixed)`` ``[1, 1, *size]``: an 8-bit textured ellipsoid in a zero background, and a warped copy."""
    generator = torch.Generator().manual_seed(0)
    axes = [torch.linspace(-1, 1, s) for s in size]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).norm(dim=0)
    coarse = torch.rand(1, 1, *(max(2, s // 8) for s in size), generator=generator)
    texture = nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
    fixed = torch.round(torch.where(radius < 0.8, 0.2 + 0.8 * texture, torch.zeros(())) * 255) / 255
    velocity = nn.functional.interpolate(
        torch.randn(1, 3, 4, 4, 4, generator=generator), size=size, mode="trilinear", align_corners=True
    )
    velocity = velocity / velocity.abs().max() * 4.0
    moving = spatial.warp(fixed, spatial.integrate_velocity(-velocity))
    return moving.to(device), fixed.to(device)


def networks(size: tuple[int, int, int]) -> dict[str, Callable[[], nn.Module]]:
    from monai_unireg.cli import METHODS

    return {
        "voxelopt-cli": lambda: METHODS["voxelopt"](size),
        "voxelopt-paper": VoxelOpt,
        "voxelopt-authors": lambda: VoxelOpt(**AUTHORS_PYRAMID),
    }


def time_network(network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, repeats: int) -> dict[str, object]:
    device = fixed.device
    with torch.no_grad():
        first = network(moving, fixed)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        times, fields = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            fields.append(network(moving, fixed))
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "bit_identical": all(torch.equal(first, field) for field in fields),
        "mean_abs_ddf": float(first.abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[192, 160, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-size", type=int, nargs=3, default=[64, 64, 64])
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("voxelopt_gpu.py needs a CUDA device.")
    device = torch.device("cuda")
    size = tuple(arguments.size)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, pair {size}")
    moving, fixed = synthetic_pair(size, device)
    for name, build in networks(size).items():
        result = time_network(build().to(device), moving, fixed, arguments.repeats)
        verdict = "PASS" if result["median_s"] < 1.0 else "FAIL"
        print(
            f"{name:18s} median {result['median_s']:.3f} s (min {result['min_s']:.3f}), peak {result['peak_gib']:.2f} "
            f"GiB, bit-identical runs: {result['bit_identical']}, mean |ddf| {result['mean_abs_ddf']:.3f} voxel; "
            f"target < 1 s per pair: {verdict}"
        )
    small = tuple(arguments.cpu_size)
    moving, fixed = synthetic_pair(small, torch.device("cpu"))
    for name, build in networks(small).items():
        network = build()
        with torch.no_grad():
            cpu = network(moving, fixed)
            gpu = network.to(device)(moving.to(device), fixed.to(device)).cpu()
        difference = (gpu - cpu).abs()
        print(
            f"{name:18s} CPU vs CUDA at {small}: max |diff| {difference.max():.4f}, mean {difference.mean():.5f} voxel"
        )


if __name__ == "__main__":
    main()
