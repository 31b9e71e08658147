"""Pieces shared by the bundles' training workflows (uniGradICON, SACB-Net, PromptReg, UniReg).

:func:`working_size` and :func:`size_text` read and print a network's working size; :func:`check_resumable`
refuses to resume from another run's checkpoint; :func:`write_result_table` writes an evaluation table as CSV and
markdown; :func:`check_datasets` and :func:`load_validation_pairs` /
:func:`validation_set` check the data a workflow is given; :func:`distributed_training` joins ``torch.distributed``
when ``torchrun`` launched the process (NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; Gloo on the CPU) and
:func:`wrap_distributed` gives the ``DistributedDataParallel`` copy of a network that
:func:`~monai_unireg.engines.train_registration` trains.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from monai_unireg import io
from monai_unireg.data import load_learn2reg, read_learn2reg
from monai_unireg.validation import check_bool, check_integer

__all__ = [
    "DistributedRun",
    "check_datasets",
    "check_resumable",
    "size_text",
    "working_size",
    "write_result_table",
    "distributed_training",
    "load_validation_pairs",
    "validation_set",
    "wrap_distributed",
]


def working_size(input_size: int | Sequence[int], multiple: int) -> tuple[int, ...]:
    """``input_size`` as 3 sizes ``(D, H, W)`` (an int is a cube), each a positive multiple of ``multiple``."""
    sizes = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
    if len(sizes) != 3 or any(check_integer(s, "input_size", multiple) % multiple for s in sizes):
        raise ValueError(
            f"input_size must be one size or 3 sizes (D, H, W), each a multiple of {multiple}, got {input_size!r}."
        )
    return sizes


def size_text(size: Sequence[int]) -> str:
    """``"160x192x224"``."""
    return "x".join(str(s) for s in size)


def _describe(config: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={config.get(key)!r}" for key in keys)


def check_resumable(
    output_dir: str | os.PathLike, config: dict[str, Any], datasets: Sequence[str] | None = None, hint: str = ""
) -> None:
    """Refuse to resume from a checkpoint of another network (its weights would not fit, or mean another model) or,
    with ``datasets``, of other training datasets.

    Args:
        output_dir: the training folder (its ``checkpoint.pt``, if any, is checked).
        config: the new network's ``config``.
        datasets: the names of the datasets this run trains on (``None``: not checked).
        hint: what else must stay the same, added to the datasets message (e.g. ``" and held_out"``).

    Raises:
        ValueError: the checkpoint holds another configuration, or was trained on other datasets.
    """
    path = Path(output_dir) / "checkpoint.pt"
    if not path.exists():
        return
    state = io.load_weights(path, "checkpoint to resume")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint to resume {str(path)!r} does not hold a training checkpoint dictionary.")
    saved = state.get("config") or {}
    if saved != config:
        changed = sorted(key for key in {*saved, *config} if saved.get(key) != config.get(key))
        raise ValueError(
            f"{path} was written for a network with {_describe(saved, changed)}, but this run builds one with "
            f"{_describe(config, changed)}; resume with the same settings, or pass --resume False (which starts over) "
            "or another output_dir."
        )
    trained_on = list((state.get("sampler") or {}).get("datasets", []))
    if datasets is not None and trained_on != list(datasets):
        raise ValueError(
            f"{path} was trained on the datasets {trained_on}, but this run trains on {list(datasets)}; resume with "
            f"the same datasets{hint}, or pass --resume False (which starts over) or another output_dir."
        )


def write_result_table(path_stem: Path, header: Sequence[str], rows: Sequence[Sequence[str]], footnote: str) -> None:
    """Write a table as ``<path_stem>.csv`` and as ``<path_stem>.md`` (a markdown table and ``footnote`` below it),
    each atomically.

    Args:
        path_stem: the files' path without suffix, e.g. ``out/evaluation_table``.
        header: the column names.
        rows: the cells, one sequence per row.
        footnote: what the numbers are (the markdown file's last paragraph).
    """
    with io.atomic_path(path_stem.with_suffix(".csv")) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])
    markdown = [
        f"| {' | '.join(header)} |",
        f"|{'---|' * len(header)}",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        footnote,
    ]
    with io.atomic_path(path_stem.with_suffix(".md")) as temporary:
        temporary.write_text("\n".join(markdown) + "\n", encoding="utf-8")


def check_datasets(datasets: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """``datasets`` as a list, checked to be a non-empty list of Learn2Reg ``*_dataset.json`` paths.

    Raises:
        ValueError: a single path (a string) or an empty list.
    """
    if isinstance(datasets, (str, os.PathLike)) or not datasets:
        raise ValueError(f"datasets must be a non-empty list of Learn2Reg *_dataset.json paths, got {datasets!r}.")
    return list(datasets)


def load_validation_pairs(
    dataset_json: str | os.PathLike | None, section: str = "registration_val", max_pairs: int | None = None
) -> list[dict[str, str]]:
    """The labelled pairs scored after every training epoch: the first ``max_pairs`` of ``section``.

    Returns ``[]`` when ``dataset_json`` is ``None``.

    Raises:
        ValueError: a pair lacks a fixed or moving label (Dice needs both), or ``max_pairs`` < 1.
    """
    if dataset_json is None:
        return []
    if max_pairs is not None:
        check_integer(max_pairs, "max_validation_pairs", 1)
    pairs = load_learn2reg(dataset_json, section)[:max_pairs]
    for pair in pairs:
        if "fixed_label" not in pair or "moving_label" not in pair:
            raise ValueError(
                f"validation_json {os.fspath(dataset_json)!r}: the {section} pair {pair['fixed_image']} <- "
                f"{pair['moving_image']} lacks a label map; validation Dice needs both labels."
            )
    return pairs


def validation_set(
    dataset_json: str | os.PathLike | None,
    section: str = "registration_val",
    max_pairs: int | None = None,
    labels: Sequence[int] | None = None,
) -> tuple[list[dict[str, str]], Sequence[int] | None]:
    """The validation pairs (:func:`load_validation_pairs`) and the label values their Dice averages.

    Returns:
        the pairs (``[]`` without ``dataset_json``) and ``labels``, or, when ``labels`` is ``None`` and there are
        pairs, the json's ``evaluation_labels`` (``None``, i.e. every non-zero label, when it names none).
    """
    pairs = load_validation_pairs(dataset_json, section, max_pairs)
    if pairs and labels is None:
        labels = read_learn2reg(dataset_json).evaluation_labels or None
    return pairs, labels


@dataclass(frozen=True)
class DistributedRun:
    """Where a training process stands in ``torch.distributed`` (see :func:`distributed_training`).

    Attributes:
        enabled: whether the process takes part in a process group.
        rank: its rank (0 without a group).
        world_size: the number of processes (1 without a group).
        device: its training device (``cuda:LOCAL_RANK`` under torchrun on CUDA).
        backend: ``"nccl"`` or ``"gloo"`` (``None`` without a group).
    """

    enabled: bool
    rank: int
    world_size: int
    device: torch.device
    backend: str | None


def _join(distributed: bool | None, device: torch.device) -> tuple[bool, bool, torch.device]:
    """Join ``torch.distributed`` as :func:`distributed_training` says.

    Returns:
        whether this process takes part, whether it started the process group (and so ends it), its device.
    """
    launched = "WORLD_SIZE" in os.environ  # set by torchrun, with RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed is None:
        distributed = world_size > 1
    if distributed and not launched:
        raise ValueError(
            "distributed is true (multi_gpu_train.yaml) but this process was not started by torchrun (no WORLD_SIZE "
            "in the environment); run torchrun --nproc_per_node N -m monai.bundle run ..., or train.yaml alone."
        )
    if not distributed and world_size > 1:
        raise ValueError(
            f"distributed is false, but torchrun started {world_size} processes (WORLD_SIZE), which would all "
            "train alone and write the same checkpoint; leave distributed null or true."
        )
    if not distributed:
        return False, False, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return True, False, device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, True, device


@contextlib.contextmanager
def distributed_training(distributed: bool | None, device: torch.device) -> Iterator[DistributedRun]:
    """Take part in ``torch.distributed`` for the duration of a training run, as ``torchrun`` launched it.

    ``distributed=None`` joins when ``torchrun`` started several processes (``WORLD_SIZE`` > 1 in the
    environment); ``True`` joins even with one process and refuses to run without ``torchrun``; ``False`` trains
    alone and is refused when ``torchrun`` started several processes (they would all write the same checkpoint).
    Joining puts each process on ``cuda:LOCAL_RANK`` with NCCL when ``device`` is CUDA, and uses Gloo on the CPU;
    a process group the caller started is used and left open. When the block ends without an error, the
    processes wait for each other (so none leaves while rank 0 still writes); a group started here is ended.

    Args:
        distributed: ``None``, ``True`` or ``False`` (see above).
        device: the requested device (its index is replaced by ``LOCAL_RANK`` on CUDA).

    Yields:
        the process's :class:`DistributedRun`.

    Raises:
        ValueError: a ``distributed`` setting that does not match the launch.
    """
    if distributed is not None:
        check_bool(distributed, "distributed")
    enabled, owns_group, device = _join(distributed, device)
    try:
        if enabled:
            run = DistributedRun(True, dist.get_rank(), dist.get_world_size(), device, dist.get_backend())
        else:
            run = DistributedRun(False, 0, 1, device, None)
        yield run
        if enabled:
            dist.barrier()
    finally:
        if owns_group:
            dist.destroy_process_group()


def wrap_distributed(network: nn.Module, run: DistributedRun, static_graph: bool = False) -> nn.Module | None:
    """The ``DistributedDataParallel`` copy of ``network`` that a distributed run trains (``None`` without one).

    Args:
        network: the network, already on ``run.device``.
        run: the process's place in ``torch.distributed`` (:func:`distributed_training`).
        static_graph: declare the graph static, needed when the objective calls the network more than once per
            step (uniGradICON registers both directions of a pair with the same weights).
    """
    if not run.enabled:
        return None
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids, static_graph=static_graph)
