"""The ``monai-unireg`` command line (also ``python -m monai_unireg``).

``monai-unireg register --fixed F --moving M [--fixed-label L --moving-label L [--labels N ...]]
[--method voxelopt|unigradicon|sacbnet|promptreg|unireg] [--weights PATH] [--io-iterations N]
[--task REGION] [--reg-type inter|intra] [--modality ct|mri|auto] [--device auto|cpu|cuda] [--no-metrics]
[--no-overview] [--debug] --out DIR`` registers any NIfTI pair, with no training and no GPU by default (VoxelOpt on
MIND-SSC features); ``--method unigradicon``, ``--method sacbnet``, ``--method promptreg`` and ``--method unireg`` use
the weights a user gives (UniReg with the condition ``--task`` and ``--reg-type``).
``monai-unireg demo --out DIR`` does the same on a pair the package generates itself, so it runs on a fresh
machine without data.

How it behaves:

- Cheap to start: this module imports only the standard library; torch, MONAI and the methods are imported after
  the options are parsed and checked, so ``--help``, ``--version`` and a bad option answer at once.
- Every option is checked before any image is read; every failure a user can cause (bad option, file, label,
  output folder, full disk) ends in one line ``monai-unireg: error: ...`` naming the option or file and what was
  expected, exit status 2; a traceback only with ``--debug``.
- Progress per stage and per pyramid level (a bar on a terminal, plain lines otherwise) and the whole run's wall
  time, split by stage, at the end.
- Outputs: the output folder is checked by a test write before anything is computed; a rerun into it replaces every
  result file of the earlier run (see :data:`monai_unireg.engines.pair_registration.OUTPUT_FILES`); temporaries
  are removed on any exit, and one left by a killed run is removed by the next run into the folder.

Methods are listed in :data:`METHODS` (name -> factory of the network) with the options each accepts in
:data:`METHOD_OPTIONS`; a new method or a new option of one (e.g. a refinement stage of VoxelOpt) is added there.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import gc
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time: the command line starts without torch
    import torch.nn as nn

__all__ = ["main", "run", "build_parser", "METHODS", "METHOD_OPTIONS", "UsageError"]

_START = time.perf_counter()

#: Intensity normalisations (``monai_unireg.engines.MODALITIES``; the tests check they agree).
MODALITIES = ("auto", "ct", "mri")
#: UniReg's registration types and default condition (``monai_unireg.networks.nets.REGISTRATION_TYPES``,
#: ``monai_unireg.engines.unireg.DEFAULT_TASK`` / ``DEFAULT_REG_TYPE``; the tests check they agree).
REGISTRATION_TYPES = ("inter", "intra")
DEFAULT_TASK = "brain"
DEFAULT_REG_TYPE = "inter"
#: Upper bound of ``--io-iterations``: each step is a forward and backward pass of the network at full size (the
#: uniGradICON paper uses 50; 10000 steps already take hours on a CPU).
MAX_IO_ITERATIONS = 10_000
#: Largest label value (label maps are written as integers of at most 32 bits).
MAX_LABEL = 2**31 - 1
#: Largest ``--seed`` (numpy and torch generators take 32-bit seeds).
MAX_SEED = 2**32 - 1


class UsageError(Exception):
    """A bad command line: reported as one line and exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Methods: factories of the network (imports inside, so the module stays light)
# ---------------------------------------------------------------------------------------------------------------


def _voxelopt(
    shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0, refinement: bool = True
) -> nn.Module:
    """The training-free default. With ``refinement`` (the default; **ours, beyond the VoxelOpt paper**): VoxelOpt on
    MIND-SSC run on the pair downsampled by 2, followed by a continuous Adam refinement of its field at half and full
    resolution (:func:`~monai_unireg.engines.refinement.refined_voxelopt`, settings ``CLI_VOXELOPT`` /
    ``CLI_REFINEMENT`` with their measurements). ``benchmarks/peers.py`` (2 threads, same run as ANTs SyNOnly,
    Greedy and FireANTs; issue 13's note): 8-bit BrainVXM2mm known field Dice 0.933 / endpoint error 0.46 mm
    against the paper's VoxelOpt 0.853 / 1.09 mm (Greedy 0.931 / 0.51 mm); CT 0.905 / 1.36 mm against 0.841 /
    2.36 mm; BrainSynth (4 pairs) 0.754 against 0.665.

    Without (``--no-refinement``): VoxelOpt alone, the paper's settings with 5 levels (fewer for small volumes, see
    :meth:`VoxelOpt.levels_for`) and a finer MIND-SSC than the authors' code (radius 1, dilation 1 instead of 2, 2;
    their abdomen CT setting computes MIND on the 2 mm grid and optimises from 4 mm down).
    """
    from monai_unireg.networks.nets.voxelopt import VoxelOpt

    if weights is not None or io_iterations:
        raise ValueError("--weights and --io-iterations apply to learned methods; voxelopt needs no training.")
    if refinement:
        from monai_unireg.engines.refinement import refined_voxelopt

        return refined_voxelopt(shape)
    return VoxelOpt(num_levels=VoxelOpt.levels_for(shape), mind_radius=1, mind_dilation=1)


def _unigradicon(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """uniGradICON with the user's weights: the released ``Step_2_final.trch`` (the published network at 175^3) or
    a checkpoint of ours (its own size and channels), optionally with instance optimisation."""
    from monai_unireg.engines import InstanceOptimised
    from monai_unireg.networks.nets import load_unigradicon

    if weights is None:
        raise ValueError("--method unigradicon needs --weights PATH (e.g. the released Step_2_final.trch).")
    network = load_unigradicon(weights)
    return InstanceOptimised(network, io_iterations, log=_log) if io_iterations else network


def _sacbnet(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """SACB-Net from a checkpoint of ours (``model.pt`` of the trainer or the bundle), run at the size it was
    trained at (the pair is resized to it and the field brought back)."""
    from monai_unireg.networks.nets import ResizedRegistration, load_sacbnet

    if weights is None:
        raise ValueError("--method sacbnet needs --weights PATH (a model.pt written by SACB-Net training).")
    if io_iterations:
        raise ValueError("--io-iterations applies to unigradicon and unireg; SACB-Net has no instance optimisation.")
    network = load_sacbnet(weights)
    return ResizedRegistration(network, network.input_size)


def _promptreg(shape: tuple[int, ...], weights: Path | None = None, io_iterations: int = 0) -> nn.Module:
    """PromptReg from a checkpoint of ours (``model.pt`` of the trainer or the bundle), run at the size it was
    trained at (paper: 160^3; the pair is resized to it and the field brought back)."""
    from monai_unireg.networks.nets import ResizedRegistration, load_promptreg

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
    from monai_unireg.engines import unireg_registration
    from monai_unireg.networks.nets import load_unireg

    if weights is None:
        raise ValueError("--method unireg needs --weights PATH (a model.pt written by UniReg training).")
    return unireg_registration(load_unireg(weights), task, reg_type, io_iterations, log=_log)


#: Registration methods by name: a function of the fixed grid's spatial shape (and the user's weights and
#: instance-optimisation steps, for learned methods; UniReg's condition) returning the network.
METHODS: dict[str, Callable[..., nn.Module]] = {
    "voxelopt": _voxelopt,
    "unigradicon": _unigradicon,
    "sacbnet": _sacbnet,
    "promptreg": _promptreg,
    "unireg": _unireg,
}
#: The method-specific options each method takes (by their ``argparse`` destination), and which of them it needs.
#: Any other method-specific option given with it is refused before anything is read.
METHOD_OPTIONS: dict[str, dict[str, frozenset[str]]] = {
    "voxelopt": {"accepts": frozenset({"no_refinement"}), "needs": frozenset()},
    "unigradicon": {"accepts": frozenset({"weights", "io_iterations"}), "needs": frozenset({"weights"})},
    "sacbnet": {"accepts": frozenset({"weights"}), "needs": frozenset({"weights"})},
    "promptreg": {"accepts": frozenset({"weights"}), "needs": frozenset({"weights"})},
    "unireg": {
        "accepts": frozenset({"weights", "io_iterations", "task", "reg_type"}),
        "needs": frozenset({"weights"}),
    },
}
#: What each method's ``--weights`` is, for the refusal when it is missing.
_WEIGHTS_HINT = {
    "unigradicon": "the released Step_2_final.trch, or a model.pt of our uniGradICON training",
    "sacbnet": "a model.pt written by SACB-Net training",
    "promptreg": "a model.pt written by PromptReg training",
    "unireg": "a model.pt written by UniReg training",
}
#: Method-specific options: destination -> (option string, whether the user gave it).
_METHOD_SPECIFIC = {
    "weights": ("--weights", lambda a: a.weights is not None),
    "io_iterations": ("--io-iterations", lambda a: a.io_iterations != 0),
    "task": ("--task", lambda a: a.task is not None),
    "reg_type": ("--reg-type", lambda a: a.reg_type is not None),
    "no_refinement": ("--no-refinement", lambda a: a.no_refinement),
}


def _method_defaults(method: str) -> Any:
    """The method's :class:`~monai_unireg.engines.defaults.MethodDefaults` (CT window, intensity range, ...): its one
    home, shared with the bundles and the trainers."""
    from monai_unireg.engines import method_defaults

    return method_defaults(method)


# ---------------------------------------------------------------------------------------------------------------
# The parser: one-line errors with suggestions, bounded numbers
# ---------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """``argparse`` without abbreviations, whose errors raise :class:`UsageError` with one line: an unknown option
    is named with the nearest known one ("unrecognised option --fixd (did you mean --fixed?)")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def known_options(self) -> list[str]:
        options = [o for action in self._actions for o in action.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    options += [o for sub in parser._actions for o in sub.option_strings]
        return sorted(set(options))

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(_rewrite(message, self))


def _rewrite(message: str, parser: _Parser) -> str:
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        tokens = unknown.group(1).split()
        options = [t for t in tokens if t.startswith("-") and not _is_number(t)]
        if not options:
            return f"unexpected argument {tokens[0]!r} (every value belongs to an option, e.g. --fixed PATH)"
        option = options[0].split("=", 1)[0]
        return f"unrecognised option {option}{_suggestion(option, parser.known_options())}"
    choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        name, value, allowed = choice.groups()
        names = [c.strip().strip("'") for c in allowed.split(",")]
        what = "command" if name in ("command", "{register,demo}") else name
        return f"{what}: unknown {value!r}; expected one of {', '.join(names)}{_suggestion(value, names)}"
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        return f"{required.group(1)} is required (see --help)"
    return message.replace("argument ", "", 1) if message.startswith("argument ") else message


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-\d+(\.\d*)?", text) is not None


def _suggestion(value: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _bounded_int(low: int, high: int, why: str) -> Callable[[str], int]:
    """``type=`` for an integer option from ``low`` to ``high``; the refusal says why the bounds are what they are."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high} ({why}), got {text!r}")
        return value

    return parse


_IO_ITERATIONS = _bounded_int(
    0,
    MAX_IO_ITERATIONS,
    "steps of instance optimisation, each a forward and backward pass of the network; the paper uses 50",
)
_LABEL = _bounded_int(1, MAX_LABEL, "a label value of the label maps; 0 is the background")
_SEED = _bounded_int(0, MAX_SEED, "random generators take 32-bit seeds")


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


class _Version(argparse.Action):
    """``--version``: the installed package's version (``importlib.metadata``), read only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        print(f"monai-unireg {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("monai-unireg")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from monai_unireg import __version__

        return __version__


_REGISTER_DESCRIPTION = """\
Register --moving to --fixed and write to --out: warped.nii.gz (the moving image on the fixed grid),
warped_label.nii.gz (with label maps), ddf.nii.gz (ITK/ANTs displacement field, LPS mm), metrics.json (Dice
after and before registration, HD95, SDlogJ, folding, the time of every stage) and overview.png (sagittal,
coronal and axial slices oriented from the fixed image's affine).

--out is made if needed and checked by a test write before anything is computed. A rerun into a folder that
holds an earlier run's results replaces every one of them: a result file the new run does not write (e.g.
warped_label.nii.gz when it has no labels, overview.png with --no-overview) is removed. Other files are left
alone. Temporaries are removed on any exit; one left by a killed run is removed by the next run into the folder.
Every failure a user can cause ends in one line naming the option or file, exit status 2 (--debug: traceback)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``monai-unireg`` argument parser (nothing heavy is imported)."""
    parser = _Parser(prog="monai-unireg", description="Deformable 3D registration of NIfTI images (monai_unireg).")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="{register,demo}", parser_class=_Parser)

    register = commands.add_parser(
        "register",
        help="register a moving image to a fixed image",
        description=_REGISTER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("--fixed", type=Path, metavar="PATH", help="fixed image (NIfTI); required")
    register.add_argument("--moving", type=Path, metavar="PATH", help="moving image (NIfTI, any grid); required")
    register.add_argument("--out", type=Path, metavar="DIR", help="output folder (made if needed); required")
    register.add_argument(
        "--fixed-label", type=Path, metavar="PATH", help="fixed label map, for Dice / HD95 (with --moving-label)"
    )
    register.add_argument(
        "--moving-label", type=Path, metavar="PATH", help="moving label map, warped by the result (with --fixed-label)"
    )
    register.add_argument(
        "--labels",
        type=_LABEL,
        nargs="+",
        metavar="N",
        help="label values the Dice / HD95 means average over, e.g. a dataset's evaluation list (default: every "
        "label present in both maps); each must be in one of the maps",
    )
    register.add_argument("--method", choices=sorted(METHODS), default="voxelopt", help="default: voxelopt")
    register.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="weights file of a learned method (required with it): unigradicon (the released Step_2_final.trch or a "
        "model.pt), sacbnet, promptreg or unireg (a model.pt of training); never downloaded",
    )
    register.add_argument(
        "--io-iterations",
        type=_IO_ITERATIONS,
        default=0,
        metavar="N",
        help=f"instance optimisation steps of unigradicon (paper: 50) or unireg, 0 to {MAX_IO_ITERATIONS} (default 0)",
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
    register.add_argument(
        "--no-refinement",
        action="store_true",
        help="voxelopt: the paper's VoxelOpt alone, without our continuous refinement of its field (default: refined)",
    )
    register.add_argument("--modality", choices=MODALITIES, default="auto", help="intensity normalisation")
    _common(register)
    register.add_argument(
        "--no-metrics", action="store_true", help="skip Dice / HD95 / Jacobian (batch use); metrics.json keeps timing"
    )
    register.add_argument("--no-overview", action="store_true", help="do not draw overview.png (batch use)")

    demo = commands.add_parser(
        "demo",
        help="register a generated pair with a known deformation",
        description="Generate a phantom pair with a known smooth deformation (inputs in OUT/inputs), register it "
        "with VoxelOpt and write the same outputs as 'register', plus the endpoint error against the truth.",
    )
    demo.add_argument("--out", type=Path, metavar="DIR", help="output folder (made if needed); required")
    demo.add_argument("--seed", type=_SEED, default=0, help="random seed of the generated pair (default 0)")
    _common(demo)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=_device, default="auto", help="auto (CUDA when available; default), cpu, cuda or cuda:N"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything is read
# ---------------------------------------------------------------------------------------------------------------


def _check_register(arguments: argparse.Namespace) -> None:
    """Every option of ``register`` checked, and the input files' existence, before any file is read."""
    for name in ("fixed", "moving", "out"):
        if getattr(arguments, name) is None:
            raise UsageError(f"--{name} is required (see monai-unireg register --help)")
    method, spec = arguments.method, METHOD_OPTIONS[arguments.method]
    for destination, (option, given) in _METHOD_SPECIFIC.items():
        if given(arguments) and destination not in spec["accepts"]:
            takers = [m for m, s in METHOD_OPTIONS.items() if destination in s["accepts"]]
            raise UsageError(
                f"{option} does nothing for --method {method}; it applies to --method {' or '.join(takers)}"
            )
    if "weights" in spec["needs"] and arguments.weights is None:
        raise UsageError(f"--method {method} needs --weights PATH ({_WEIGHTS_HINT[method]})")
    if (arguments.fixed_label is None) != (arguments.moving_label is None):
        given, missing = ("--fixed-label", "--moving-label")[:: 1 if arguments.fixed_label is not None else -1]
        raise UsageError(f"{given} was given without {missing}; give both label maps (or neither)")
    if arguments.labels is not None:
        if arguments.fixed_label is None:
            raise UsageError("--labels chooses the labels to evaluate; give --fixed-label and --moving-label with it")
        if arguments.no_metrics:
            raise UsageError("--labels chooses the labels of the metrics, which --no-metrics turns off")
        repeated = sorted({v for v in arguments.labels if arguments.labels.count(v) > 1})
        if repeated:
            raise UsageError(f"--labels: {repeated[0]} is given more than once")
    inputs = {
        "--fixed": arguments.fixed,
        "--moving": arguments.moving,
        "--fixed-label": arguments.fixed_label,
        "--moving-label": arguments.moving_label,
        "--weights": arguments.weights,
    }
    for option, path in inputs.items():
        if path is not None and not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UsageError(f"{option} {str(path)!r} {what}; expected a file")
    from monai_unireg.engines.pair_registration import OUTPUT_FILES  # the first heavy import (torch, MONAI)

    outputs = {(arguments.out / name).resolve() for name in OUTPUT_FILES}
    for option, path in inputs.items():
        if path is not None and path.resolve() in outputs:
            raise UsageError(f"{option} {str(path)!r} is a result file this run writes; choose another --out")
    _check_device(arguments.device)


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------


class _LevelProgress:
    """``progress(done, total)`` for a network's pyramid levels: a bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        if self.terminal:
            width = 30
            filled = round(width * done / max(total, 1))
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r      [{bar}] level {done}/{total}, {elapsed:.1f} s{end}")
            self.stream.flush()
        else:
            _log(f"      level {done}/{total} done ({elapsed:.1f} s)")


def _attach_progress(network: nn.Module) -> None:
    """Give every module of ``network`` with a ``progress`` attribute (VoxelOpt's pyramid) a progress reporter; its
    clock starts when the network is called."""
    reporter = _LevelProgress()
    targets = [module for module in network.modules() if hasattr(module, "progress")]
    for module in targets:
        module.progress = reporter
    if targets:
        network.register_forward_pre_hook(lambda module, inputs: reporter.restart())


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> bool:
    """Make and test-write ``--out``, removing an interrupted run's temporaries; returns whether it was made now."""
    from monai_unireg.engines.pair_registration import prepare_output_folder

    made = not out.exists()
    try:
        removed = prepare_output_folder(out, "--out")
    except ValueError as error:
        raise UsageError(str(error).rstrip(".")) from None
    if removed:
        names = ", ".join(path.name for path in removed)
        _log(f"removed {len(removed)} temporar{'y' if len(removed) == 1 else 'ies'} of an interrupted run: {names}")
    return made


class _RemoveIfEmpty:
    """Within the block, a failure removes the output folder again if this run made it and left it empty."""

    def __init__(self, folder: Path, made: bool) -> None:
        self.folder, self.made = folder, made

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is not None and self.made and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _register(arguments: argparse.Namespace) -> dict:
    _check_register(arguments)
    conditions = {
        name: value for name, value in (("task", arguments.task), ("reg_type", arguments.reg_type)) if value is not None
    }
    if arguments.no_refinement:
        conditions["refinement"] = False
    with _RemoveIfEmpty(arguments.out, _prepare_out(arguments.out)):
        return _register_into(arguments, conditions)


def _register_into(arguments: argparse.Namespace, conditions: dict[str, str]) -> dict:
    from monai_unireg.engines.pair_registration import register_files, volume_shape

    defaults = _method_defaults(arguments.method)
    start = time.perf_counter()
    network = METHODS[arguments.method](
        volume_shape(arguments.fixed, "--fixed"), arguments.weights, arguments.io_iterations, **conditions
    )
    _attach_progress(network)
    _freeze_heap()
    setup = time.perf_counter() - start
    metrics = register_files(
        network,
        arguments.fixed,
        arguments.moving,
        arguments.out,
        fixed_label=arguments.fixed_label,
        moving_label=arguments.moving_label,
        modality=arguments.modality,
        device=arguments.device,
        labels=arguments.labels,
        ct_window=defaults.ct_window,
        log=_log,
        intensity_range=defaults.intensity_range,
        metrics=not arguments.no_metrics,
        overview=not arguments.no_overview,
    )
    metrics["timing_s"] = {"setup": round(setup, 3), **metrics["timing_s"]}
    return metrics


def _demo(arguments: argparse.Namespace) -> dict:
    if arguments.out is None:
        raise UsageError("--out is required (see monai-unireg demo --help)")
    _check_device(arguments.device)
    _prepare_out(arguments.out)
    import torch

    from monai_unireg import io
    from monai_unireg.data.synthetic import make_synthetic_pair
    from monai_unireg.engines.pair_registration import register_files
    from monai_unireg.spatial import spacing_from_affine

    _log(f"generating a phantom pair with a known deformation in {arguments.out / 'inputs'}")
    start = time.perf_counter()
    pair = make_synthetic_pair(seed=arguments.seed)
    inputs = pair.save(arguments.out / "inputs")
    generating = time.perf_counter() - start
    network = METHODS["voxelopt"](tuple(pair.fixed.shape[2:]))
    _attach_progress(network)
    _freeze_heap()
    metrics = register_files(
        network,
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
    metrics["timing_s"] = {"generating": round(generating, 3), **metrics["timing_s"]}
    return metrics


def _freeze_heap() -> None:
    """Keep the garbage collector off every object alive now (torch, numpy, nibabel and our modules, the network),
    and let it run again (:func:`main` stops it while the modules import: their objects live to the end).

    Python's cyclic collector otherwise walks these ~300 000 long-lived objects at every full collection (five
    during the imports, about 1 s) and once more at exit (about 2 s on the 8-bit BrainVXM2mm pair, loaded machine;
    ``benchmarks/register_stages.py``). :func:`main` undoes it for in-process callers.
    """
    gc.freeze()
    gc.enable()


def _log(message: str) -> None:
    print(message, flush=True)


def _summary(metrics: dict) -> str:
    """The whole run's wall time (from the start of the process's Python code) split by stage."""
    total = time.perf_counter() - _START
    stages = metrics.get("timing_s", {})
    network = metrics.get("runtime_s")
    parts = [f"{name} {seconds:.1f} s" for name, seconds in stages.items()]
    inside = f" (network {network:.1f} s)" if network is not None else ""
    imports = total - sum(stages.values())
    return f"done in {total:.1f} s wall: {', '.join(parts)}{inside}, start-up and imports {imports:.1f} s"


def _one_line(error: BaseException) -> str:
    """A user-facing error as one line."""
    if isinstance(error, OSError) and not isinstance(error, UsageError):
        where = f" {error.filename!r}" if error.filename else ""
        reason = error.strerror or str(error)
        return f"could not access{where}: {reason}" if where else reason
    return " ".join(str(error).split())


def _choose_openmp_wait_policy() -> None:
    """Let OpenMP's waiting threads spin only when the cores are free (effective before torch is imported).

    Spinning (libgomp's default) hands work between threads fastest, and the refinement's coarse levels are many
    small operations: on a quiet 2-core machine ``OMP_WAIT_POLICY=PASSIVE`` made the 4x and 2x levels of the 8-bit
    BrainVXM2mm pair 2x slower (0.15 s -> 0.34 s, 0.45 s -> 0.84 s; the full-resolution level the same). On cores
    shared with other jobs, spinning threads take the cores from them and from each other: with 6 busy loops on 2
    cores the same levels took 1.9 s and 8.5 s spinning (10 000 spins) against 0.74 s and 4.4 s passive, and VoxelOpt
    was 2-4x slower (20-40x at 32^3). So: passive when other processes keep running (Linux ``/proc/loadavg``,
    the fewest running over five looks 2 ms apart, so that a process just starting is not counted) and our
    threads outnumber the cores, or when that cannot be read; a user's own ``OMP_WAIT_POLICY`` is kept.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        threads = min(int(os.environ.get("OMP_NUM_THREADS", "") or cores), cores)
        others = cores
        for look in range(5):
            if look:
                time.sleep(0.002)
            with open("/proc/loadavg") as handle:
                others = min(others, int(handle.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        threads = others = cores
    if others + threads > cores:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input, 1 an internal error, 130 interrupted).

    Every failure a user can cause (options, files, labels, output folder, full disk, memory) is reported as one
    line on stderr with status 2; ``--debug`` shows the traceback instead.
    """
    arguments_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments_list
    _choose_openmp_wait_policy()
    collecting = gc.isenabled()
    gc.disable()  # until _freeze_heap, after the imports and the network's construction
    try:
        arguments = build_parser().parse_args(arguments_list)
        if arguments.command is None:
            raise UsageError("a command is required: register or demo (see monai-unireg --help)")
        with _terminate_as_exit():
            metrics = {"register": _register, "demo": _demo}[arguments.command](arguments)
        _log(_summary(metrics))
    except KeyboardInterrupt:
        print("monai-unireg: interrupted; nothing half-written was left in --out", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, MemoryError) as error:
        if debug:
            raise
        message = _one_line(error) if not isinstance(error, MemoryError) else "out of memory: " + _one_line(error)
        print(f"monai-unireg: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if debug:
            raise
        text = _one_line(error)
        if "out of memory" in text or "can't allocate memory" in text:
            print(f"monai-unireg: error: not enough memory for the pair on this device ({text[:200]})", file=sys.stderr)
            return 2
        print(f"monai-unireg: internal error: {text[:500]} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as error:  # a bug, not the user's doing: still one line unless --debug
        if debug:
            raise
        kind = type(error).__name__
        print(f"monai-unireg: internal error: {kind}: {_one_line(error)[:500]} (rerun with --debug)", file=sys.stderr)
        return 1
    finally:
        if argv is not None:  # called in-process (tests, scripts): the collector sees the caller's objects again
            gc.unfreeze()
        if collecting:
            gc.enable()
    return 0


#: glibc ``mallopt`` parameters (``malloc.h``) and the environment variables that set them at a process's start.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _reuse_freed_memory() -> None:
    """With glibc: serve every allocation from the heap and keep freed memory there for the next tensor, instead of
    mapping each large tensor fresh from the kernel (``mallopt(M_MMAP_MAX, 0)``, ``M_TRIM_THRESHOLD`` 2 GiB).

    glibc maps every allocation above 32 MiB (a 12-channel MIND volume of a 2 mm brain is 41 MiB) with ``mmap`` and
    unmaps it when freed, so the kernel zeroes and faults in its pages again at every use: on the 8-bit BrainVXM2mm
    pair that was 1.3-1.6 s of system time per run, cut to 0.5-0.6 s, with the same peak memory
    (``benchmarks/register_stages.py``). Kept as the user set it when any ``MALLOC_*`` tuning variable is set;
    nothing happens without glibc.
    """
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def run() -> None:
    """The ``monai-unireg`` program (``python -m monai_unireg``, the console script): :func:`main` on ``sys.argv``,
    then exit without the interpreter's teardown.

    Every result is written, closed and moved into place by then; what the teardown would do (destroying some
    300 000 objects of torch, numpy and matplotlib, then a dependency, one by one) took 0.35-0.4 s of each run on the
    8-bit BrainVXM2mm pair (``benchmarks/register_stages.py``, ``exit``). Standard output and error are flushed
    first.
    """
    _reuse_freed_memory()
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class _terminate_as_exit:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C does), so ``finally`` clauses remove the
    temporaries of a run that is stopped by ``kill``; SIGKILL cannot be caught (the next run cleans up)."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    run()
