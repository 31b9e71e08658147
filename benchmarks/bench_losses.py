"""Timing and memory of the registration losses, side by side with MONAI (not run by the tests).

Measures, on the current device (CPU unless ``--device cuda``):

1. LNCC forward + backward on a ``1 x 1 x N^3`` pair (default ``N = 128``): ``LNCCLoss`` with the
   uniGradICON settings (Gaussian sigma 5, 21 taps) against MONAI's
   ``LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian", kernel_size=21)`` in the same process;
   median of ``--repeats`` runs after one warm-up run, and the speed ratio. Both use 21-tap separable
   windows, so the work is the same. Value agreement is checked like for like: MONAI's window of size 21
   has sigma 21 / 3 = 7 and MONAI returns ``-mean(lncc^2)``, so it is compared with
   ``LNCCLoss(sigma=7, kernel_size=21, squared=True, eps=1e-12) - 1`` (see the ``LNCCLoss`` docstring).
2. MIND-SSC loss (radius 2, dilation 2) forward + backward at ``N^3``: median time and peak memory.

Timings: one warm-up pass per loss, then the losses take turns for ``--repeats`` rounds (so a change of
machine load affects all alike); the median is reported.

Peak memory on the CPU (Linux) is measured in a fresh child process per configuration, after the inputs are
allocated: the peak resident set size is reset (``echo 5 > /proc/self/clear_refs``), one forward + backward
runs, and the reported figure is the new peak (``VmHWM``) minus the resident size just before the call
(``VmRSS``), i.e. the extra memory the call needs at its peak, allocator overhead included. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

Usage: ``python benchmarks/bench_losses.py [--size 128] [--repeats 5] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from torch import nn

from monai_unireg.losses import LNCCLoss, MINDSSCLoss

CONFIGURATIONS: dict[str, Callable[[], nn.Module]] = {
    "lncc": lambda: LNCCLoss(kernel_type="gaussian", sigma=5.0),
    "lncc_like_monai": lambda: LNCCLoss(kernel_type="gaussian", sigma=7.0, kernel_size=21, squared=True, eps=1e-12),
    "monai_lncc": lambda: LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian", kernel_size=21),
    "mind": lambda: MINDSSCLoss(radius=2, dilation=2),
}


def make_pair(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random pair ``[1, 1, size^3]`` in [0, 1] with partial correlation; ``pred`` requires grad."""
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, size, size, size, generator=generator)
    noise = torch.rand(1, 1, size, size, size, generator=generator)
    fixed = nn.functional.avg_pool3d(fixed, 3, stride=1, padding=1)
    moving = 0.7 * fixed.roll(2, dims=2) + 0.3 * noise
    return moving.to(device).requires_grad_(), fixed.to(device)


def forward_backward(loss: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> float:
    """One forward + backward pass; returns the loss value."""
    pred.grad = None
    value = loss(pred, target)
    value.backward()
    if pred.is_cuda:
        torch.cuda.synchronize()
    return value.detach().item()


def interleaved_timings(
    losses: dict[str, nn.Module], pred: torch.Tensor, target: torch.Tensor, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median wall time (s) of ``repeats`` forward + backward passes per loss, and its value.

    One warm-up pass each, then the losses take turns in every round, so a change of machine load during
    the run affects all of them alike.
    """
    values = {name: forward_backward(loss, pred, target) for name, loss in losses.items()}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(repeats):
        for name, loss in losses.items():
            start = time.perf_counter()
            forward_backward(loss, pred, target)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), values[name]) for name in losses}


def _status_kib(field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_child(name: str, size: int, device: torch.device) -> None:
    """Run in a fresh process: print the extra peak memory (MiB) of one forward + backward of ``name``."""
    loss = CONFIGURATIONS[name]().to(device)
    pred, target = make_pair(size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward_backward(loss, pred, target)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        forward_backward(loss, pred, target)
        extra = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"peak_mib": extra / 2**20}))


def peak_memory(name: str, size: int, device: torch.device) -> float:
    """Extra peak memory in MiB of one forward + backward of ``name``, measured in a child process."""
    command = [sys.executable, __file__, "--child", name, "--size", str(size), "--device", str(device)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="edge length N of the N^3 volumes")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--child", choices=sorted(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        peak_memory_child(args.child, args.size, device)
        return

    pred, target = make_pair(args.size, device)
    losses = {name: factory().to(device) for name, factory in CONFIGURATIONS.items()}
    timings = interleaved_timings(losses, pred, target, args.repeats)
    results = {name: (*timings[name], peak_memory(name, args.size, device)) for name in CONFIGURATIONS}

    print(
        f"device {device}, {torch.get_num_threads()} threads, volumes 1x1x{args.size}^3, "
        f"median of {args.repeats} forward+backward runs"
    )
    print(f"{'configuration':<52}{'time [s]':>10}{'peak extra [MiB]':>18}{'value':>14}")
    labels = {
        "lncc": "LNCCLoss gaussian sigma 5, 21 taps (uniGradICON)",
        "lncc_like_monai": "LNCCLoss sigma 7, 21 taps, squared, eps 1e-12",
        "monai_lncc": "MONAI LNCC gaussian kernel_size 21 (sigma 7)",
        "mind": "MINDSSCLoss radius 2, dilation 2",
    }
    for name, (seconds, value, peak) in results.items():
        print(f"{labels[name]:<52}{seconds:>10.3f}{peak:>18.1f}{value:>14.7f}")
    ratio = results["monai_lncc"][0] / results["lncc"][0]
    difference = abs((results["lncc_like_monai"][1] - 1.0) - results["monai_lncc"][1])
    print(f"LNCC speed-up over MONAI (same 21-tap window): {ratio:.1f}x")
    print(f"like-for-like value agreement |(ours - 1) - MONAI|: {difference:.2e}")


if __name__ == "__main__":
    main()
