"""The ``monai-unireg`` command line (also ``python -m monai_unireg``).

``monai-unireg register --fixed F --moving M [--fixed-label L] [--moving-label L]
[--method voxelopt|unigradicon|sacbnet|promptreg|unireg] [--weights PATH] [--io-iterations N]
[--task REGION] [--reg-type inter|intra] [--modality ct|mri|auto] [--device auto|cpu|cuda] --out DIR`` registers
any NIfTI pair, with no training and no GPU by default (VoxelOpt on MIND-SSC features); ``--method unigradicon``,
``--method sacbnet``, ``--method promptreg`` and ``--method unireg`` use the weights a user gives (UniReg with the
condition ``--task`` and ``--reg-type``).
``monai-unireg demo --out DIR`` does the same on a pair the package generates itself, so it runs on a fresh
machine without data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from monai_unireg import io
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.engines import (
    MODALITIES,
    UNIREG_CT_WINDOW,
    UNIREG_INTENSITY_RANGE,
    InstanceOptimised,
    build_unireg,
    register_files,
    unireg_registration,
)
from monai_unireg.engines.unigradicon import UNIGRADICON_CT_WINDOW
from monai_unireg.engines.unireg_workflows import DEFAULT_REG_TYPE, DEFAULT_TASK
from monai_unireg.networks.nets import (
    REGISTRATION_TYPES,
    ResizedRegistration,
    VoxelOpt,
    load_promptreg,
    load_sacbnet,
    load_unigradicon,
)
from monai_unireg.spatial import spacing_from_affine

__all__ = ["main", "build_parser", "METHODS"]


def _voxelopt(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """VoxelOpt for any scan: the paper's settings with 5 levels (fewer for small volumes, see
    :meth:`VoxelOpt.levels_for`) and a finer MIND-SSC than the authors' code (radius 1, dilation 1 instead of
    2, 2), which their abdomen CT setting registers at 4 mm. Measured on native-resolution scans
    (``benchmarks/peers.py`` pairs; the same VoxelOpt with MIND 2/2 in brackets): BrainSynth 2 mm, 10 pairs,
    Dice 0.678 (0.660); BrainVXM2mm known field, endpoint error 0.83 mm (1.09 mm); ProstateMRUS (US-MR),
    5 pairs, prostate Dice 0.657 (0.598).
    """
    if weights is not None or io_iterations:
        raise ValueError("--weights and --io-iterations apply to learned methods; voxelopt needs no training.")
    return VoxelOpt(num_levels=VoxelOpt.levels_for(shape), mind_radius=1, mind_dilation=1)


def _unigradicon(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """uniGradICON with the user's weights: the released ``Step_2_final.trch`` (the published network at 175^3) or
    a checkpoint of ours (its own size and channels), optionally with instance optimisation."""
    if weights is None:
        raise ValueError("--method unigradicon needs --weights PATH (e.g. the released Step_2_final.trch).")
    network = load_unigradicon(weights)
    return InstanceOptimised(network, io_iterations, log=_log) if io_iterations else network


def _sacbnet(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """SACB-Net from a checkpoint of ours (``model.pt`` of the trainer or the bundle), run at the size it was
    trained at (the pair is resized to it and the field brought back)."""
    if weights is None:
        raise ValueError("--method sacbnet needs --weights PATH (a model.pt written by SACB-Net training).")
    if io_iterations:
        raise ValueError("--io-iterations applies to unigradicon and unireg; SACB-Net has no instance optimisation.")
    network = load_sacbnet(weights)
    return ResizedRegistration(network, network.input_size)


def _promptreg(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """PromptReg from a checkpoint of ours (``model.pt`` of the trainer or the bundle), run at the size it was
    trained at (paper: 160^3; the pair is resized to it and the field brought back)."""
    if weights is None:
        raise ValueError("--method promptreg needs --weights PATH (a model.pt written by PromptReg training).")
    if io_iterations:
        raise ValueError("--io-iterations applies to unigradicon and unireg; PromptReg has no instance optimisation.")
    network = load_promptreg(weights)
    return ResizedRegistration(network, network.input_size)


def _unireg(
    shape: tuple[int, ...],
    weights: Path | None = None,
    io_iterations: int = 0,
    task: str = DEFAULT_TASK,
    reg_type: str = DEFAULT_REG_TYPE,
) -> nn.Module:
    """UniReg from a checkpoint of ours (``model.pt`` of the trainer or the bundle) with the condition ``task`` (a
    body region it was trained with, or an unseen anatomy's alias: its nearest region) and ``reg_type``, run at the
    size it was trained at (paper: 192x192x160); with ``io_iterations``, field instance optimisation (NCC + the
    task's regularisation prior x diffusion, paper Table 3 "UniReg + IO")."""
    if weights is None:
        raise ValueError("--method unireg needs --weights PATH (a model.pt written by UniReg training).")
    return unireg_registration(build_unireg(weights), task, reg_type, io_iterations, log=_log)


#: Registration methods by name: a function of the fixed grid's spatial shape (and the user's weights and
#: instance-optimisation steps, for learned methods; UniReg's condition) returning the network.
METHODS: dict[str, Callable[..., nn.Module]] = {
    "voxelopt": _voxelopt,
    "unigradicon": _unigradicon,
    "sacbnet": _sacbnet,
    "promptreg": _promptreg,
    "unireg": _unireg,
}
#: HU window each method's CT preprocessing uses (VoxelOpt Sec. 3.1; uniGradICON Sec. 2.1; SACB-Net Sec. 4;
#: PromptReg Sec. 3.1; UniReg Sec. 4.3).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "voxelopt": (-800.0, 500.0),
    "unigradicon": UNIGRADICON_CT_WINDOW,
    "sacbnet": (-1000.0, 1000.0),
    "promptreg": (-1000.0, 1000.0),
    "unireg": UNIREG_CT_WINDOW,
}
#: Range each method's images are normalised to (UniReg Sec. 4.3: [-1, 1]; the others [0, 1]).
INTENSITY_RANGES: dict[str, tuple[float, float]] = {
    "voxelopt": (0.0, 1.0),
    "unigradicon": (0.0, 1.0),
    "sacbnet": (0.0, 1.0),
    "promptreg": (0.0, 1.0),
    "unireg": UNIREG_INTENSITY_RANGE,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-unireg", description="Deformable 3D registration of NIfTI images (monai_unireg)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    register = commands.add_parser(
        "register",
        help="register a moving image to a fixed image",
        description="Register --moving to --fixed and write warped.nii.gz, warped_label.nii.gz (with "
        "--moving-label), ddf.nii.gz (ITK/ANTs displacement field, LPS mm), metrics.json and overview.png to --out.",
    )
    register.add_argument("--fixed", required=True, type=Path, help="fixed image (NIfTI)")
    register.add_argument("--moving", required=True, type=Path, help="moving image (NIfTI, any grid)")
    register.add_argument("--fixed-label", type=Path, help="fixed label map, for Dice / HD95")
    register.add_argument("--moving-label", type=Path, help="moving label map, warped with the result")
    register.add_argument("--method", choices=sorted(METHODS), default="voxelopt", help="default: voxelopt")
    register.add_argument(
        "--weights",
        type=Path,
        help="weights file of a learned method: unigradicon (Step_2_final.trch or a model.pt), sacbnet, promptreg or "
        "unireg (a model.pt of training)",
    )
    register.add_argument(
        "--io-iterations",
        type=int,
        default=0,
        help="instance optimisation steps of unigradicon (paper: 50) or unireg (field instance optimisation)",
    )
    register.add_argument(
        "--task",
        help=f"unireg: the body region of the pair (default: {DEFAULT_TASK}), one the network was trained with or an "
        "unseen anatomy's alias (e.g. lung -> chest)",
    )
    register.add_argument(
        "--reg-type",
        choices=REGISTRATION_TYPES,
        help=f"unireg: inter (two subjects) or intra (one subject) registration (default: {DEFAULT_REG_TYPE})",
    )
    register.add_argument("--modality", choices=MODALITIES, default="auto", help="intensity normalisation")
    register.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    register.add_argument("--labels", type=int, nargs="+", help="label values to evaluate (default: fixed labels)")
    register.add_argument("--out", required=True, type=Path, help="output folder")

    demo = commands.add_parser(
        "demo",
        help="register a generated pair with a known deformation",
        description="Generate a phantom pair with a known smooth deformation (inputs in OUT/inputs), register it "
        "with VoxelOpt and write the same outputs as 'register', plus the endpoint error against the truth.",
    )
    demo.add_argument("--out", required=True, type=Path, help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the generated pair")
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    return parser


def _conditions(arguments: argparse.Namespace) -> dict[str, str]:
    """UniReg's ``task`` and ``reg_type`` as given on the command line (its defaults where not given).

    Raises:
        ValueError: ``--task`` or ``--reg-type`` with another method, which takes no condition.
    """
    given = {
        name: value for name, value in (("task", arguments.task), ("reg_type", arguments.reg_type)) if value is not None
    }
    if arguments.method != "unireg" and given:
        raise ValueError(
            f"--task and --reg-type set the condition of --method unireg; {arguments.method} takes no condition."
        )
    return given


def _register(arguments: argparse.Namespace) -> None:
    build = METHODS[arguments.method]
    conditions = _conditions(arguments)
    register_files(
        lambda shape: build(shape, arguments.weights, arguments.io_iterations, **conditions),
        arguments.fixed,
        arguments.moving,
        arguments.out,
        fixed_label=arguments.fixed_label,
        moving_label=arguments.moving_label,
        modality=arguments.modality,
        device=arguments.device,
        labels=arguments.labels,
        ct_window=CT_WINDOWS[arguments.method],
        log=_log,
        intensity_range=INTENSITY_RANGES[arguments.method],
    )


def _demo(arguments: argparse.Namespace) -> None:
    _log(f"generating a phantom pair with a known deformation in {arguments.out / 'inputs'}")
    pair = make_synthetic_pair(seed=arguments.seed)
    inputs = pair.save(arguments.out / "inputs")
    metrics = register_files(
        METHODS["voxelopt"],
        inputs["fixed"],
        inputs["moving"],
        arguments.out,
        fixed_label=inputs["fixed_label"],
        moving_label=inputs["moving_label"],
        modality="mri",
        device=arguments.device,
        log=_log,
    )
    estimated, _ = io.load_ddf(arguments.out / "ddf.nii.gz")
    spacing = torch.tensor(spacing_from_affine(pair.affine), dtype=torch.float32).view(1, 3, 1, 1, 1)
    error = ((estimated - pair.true_ddf) * spacing).norm(dim=1)[pair.fixed_label[:, 0] > 0]
    _log(
        f"endpoint error against the true field inside the phantom: mean {error.mean():.2f} mm, "
        f"median {error.median():.2f} mm (voxels of {pair.spacing[0]:.1f} mm); mean Dice {metrics['dice_mean']:.3f}"
    )


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input)."""
    arguments = build_parser().parse_args(argv)
    try:
        {"register": _register, "demo": _demo}[arguments.command](arguments)
    except ValueError as error:
        print(f"monai-unireg: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
