"""UniReg workflows for the MONAI bundle (``bundles/unireg``): build the network, condition it, train it, tabulate.

:func:`build_unireg` gives the :class:`~monai_unireg.networks.nets.UniReg` of a weights file, or a new one from
configuration values; :func:`unireg_registration` fixes its condition (the task's body region, or an unseen
anatomy's nearest region, and the registration type), optionally adds field instance optimisation
(:class:`~monai_unireg.engines.FieldOptimised`, smoothness = the task's regularisation prior) and wraps it in
:class:`~monai_unireg.networks.nets.ResizedRegistration`, so ``inference.yaml`` and ``monai-unireg register`` run it
on pairs of any size; :func:`train_workflow` is everything ``train.yaml`` and ``multi_gpu_train.yaml`` do: one
network over several datasets, each a ``{"json", "task", "reg_type"}`` entry, with the task's prior and optional
label supervision, on one process or several (``torchrun``); :func:`evaluate_unireg` is what ``evaluate.yaml`` does:
register the pairs of several datasets, each with its condition, and write one row per dataset with the columns of
the paper's Table 2 (Dice, SDlogJ, % folding) and HD95.

Li et al., "UniReg: Foundation Model for Controllable Medical Image Registration" (``shared/papers/unireg.txt``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from monai_unireg import io
from monai_unireg.data import PairSampler, load_learn2reg, read_learn2reg
from monai_unireg.engines.instance_optimisation import FieldOptimised
from monai_unireg.engines.pair_registration import register_pairs, resolve_device, write_table
from monai_unireg.engines.training import Log
from monai_unireg.engines.unireg import (
    UNIREG_CT_WINDOW,
    UNIREG_INTENSITY_RANGE,
    UNIREG_LAMBDAS,
    UNIREG_OPTIMIZERS,
    UNIREG_SIMILARITIES,
    train_unireg,
    unireg_similarity,
)
from monai_unireg.engines.workflows import (
    check_resumable,
    distributed_training,
    size_text,
    working_size,
    wrap_distributed,
    write_result_table,
)
from monai_unireg.networks.nets import ResizedRegistration
from monai_unireg.networks.nets.unireg import DEFAULT_TASKS, REGISTRATION_TYPES, UNIREG_CHANNELS, UniReg, load_unireg
from monai_unireg.validation import check_bool, check_integer, check_option, check_positive

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_LAMBDAS",
    "DEFAULT_REG_TYPE",
    "DEFAULT_TASK",
    "DatasetEntry",
    "build_unireg",
    "dataset_entries",
    "evaluate_unireg",
    "train_workflow",
    "unireg_registration",
]

LOGGER = logging.getLogger("unireg")

#: Working size of a new network (paper Sec. 4.1: every image padded or cropped to 192 x 192 x 160 at 2 mm).
DEFAULT_INPUT_SIZE = (192, 192, 160)
#: Regularisation priors: the paper's Table 8 and 1.0 for the shared data's brain and pelvis tasks (ours).
DEFAULT_LAMBDAS = {**UNIREG_LAMBDAS, "brain": 1.0, "pelvis": 1.0}
#: The condition of ``inference.yaml`` and ``monai-unireg register --method unireg`` when none is given: the task of
#: the bundle's first default training dataset (BrainSynth), between two subjects.
DEFAULT_TASK = "brain"
DEFAULT_REG_TYPE = "inter"
#: The keys of a dataset entry of :func:`train_workflow` and :func:`evaluate_unireg`.
DATASET_KEYS = ("json", "task", "reg_type")
#: The columns of :func:`evaluate_unireg`'s table.
TABLE_HEADER = ("dataset", "task", "reg_type", "pairs", "DSC (%)", "HD95 (mm)", "SDlogJ", "folding (%)")


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset with its condition (see :func:`dataset_entries`).

    Attributes:
        json: the Learn2Reg ``*_dataset.json`` path.
        name: the dataset's name (the json's ``"name"``).
        task: the task as given (a region of the network, or an alias of one).
        region: the network's region the task resolves to.
        reg_type: ``"inter"`` or ``"intra"``.
    """

    json: str | os.PathLike
    name: str
    task: str
    region: str
    reg_type: str


def _new_network(
    input_size: int | Sequence[int],
    tasks: Sequence[str],
    task_aliases: Mapping[str, str] | None,
    channels: Sequence[int],
    dynamic_head: bool,
    feature_extractor: str | nn.Module | None,
    extractor_channels: int | None,
    seed: int,
) -> UniReg:
    """A new :class:`UniReg` whose initial weights are drawn from ``seed`` (the global random state is kept)."""
    check_integer(seed, "seed", 0)
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of body-region names, got the single string {tasks!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UniReg(
            working_size(input_size, 8),
            tasks=tasks,
            task_aliases=task_aliases,
            channels=channels,
            dynamic_head=dynamic_head,
            feature_extractor=feature_extractor,
            extractor_channels=extractor_channels,
        )


def _describe_network(network: UniReg) -> str:
    config = network.config
    head = "dynamic head" if network.dynamic_head else "static head (ablation)"
    features = {None: "images only", "mind": "images + MIND-SSC"}.get(config["feature_extractor"], "images + module")
    return (
        f"working size {size_text(network.input_size)}, channels {config['channels']}, {head}, {features}, "
        f"tasks {', '.join(network.tasks)}"
    )


def build_unireg(
    weights: str | os.PathLike | None = None,
    input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
    tasks: Sequence[str] = DEFAULT_TASKS,
    channels: Sequence[int] = UNIREG_CHANNELS,
    dynamic_head: bool = True,
    feature_extractor: str | nn.Module | None = None,
    extractor_channels: int | None = None,
    task_aliases: Mapping[str, str] | None = None,
    seed: int = 0,
    logger: logging.Logger = LOGGER,
) -> UniReg:
    """The UniReg of ``inference.yaml`` and ``evaluate.yaml``: a weights file's network, or a new one.

    Args:
        weights: a ``model.pt`` / ``checkpoint.pt`` of :func:`train_workflow`, loaded by
            :func:`~monai_unireg.networks.nets.load_unireg` with the configuration stored in it (working size,
            tasks and aliases, channels, head, feature extractor); the other arguments are then ignored, except a
            module ``feature_extractor``, which a network trained with one needs again. ``None``: a new network from
            the arguments, **untrained** (weights drawn from ``seed``): its fields are meaningless and a warning
            says so.
        input_size: working size without weights, one size or 3, each a multiple of 8 (paper: 192 x 192 x 160).
        tasks: body regions of the task one-hot (Eq. 3), in index order.
        channels: encoder channels at 1, 1/2, 1/4, 1/8 of the working size.
        dynamic_head: ``False``: one static head, the paper's Table 6 ablation ("w/o dynamic deformation
            generation").
        feature_extractor: ``None`` (images only), ``"mind"`` (MIND-SSC, the paper's suggestion for MR) or an
            ``nn.Module`` (e.g. a self-supervised anatomical embedding network, the paper's SAM).
        extractor_channels: output channels of a module ``feature_extractor``.
        task_aliases: unseen anatomy -> one of ``tasks`` (``None``: the defaults whose region is in ``tasks``).
        seed: without weights, the seed of the initial weights.
        logger: where the warning and the description of the network go.

    Raises:
        ValueError: a missing, unreadable or mismatched weights file (one that is not a UniReg checkpoint, or whose
            tensors do not fit the configuration stored in it; a module extractor missing or given in vain), or
            an invalid size, task list or channel list.
    """
    if weights is None:
        network = _new_network(
            input_size, tasks, task_aliases, channels, dynamic_head, feature_extractor, extractor_channels, seed
        )
        logger.warning(
            "no weights given: the UniReg network is untrained (random weights drawn from seed %d), so its "
            "displacement fields are meaningless, not a registration; pass --weights PATH (a model.pt of "
            "train.yaml).",
            seed,
        )
        return network
    module = feature_extractor if isinstance(feature_extractor, nn.Module) else None
    network = load_unireg(weights, module)
    logger.info("loaded %s: %s", os.fspath(weights), _describe_network(network))
    return network


def _region(network: UniReg, task: str, where: str) -> str:
    """The network's region of ``task`` (aliases resolved); the error names ``where`` the task came from."""
    if not isinstance(task, str):
        raise ValueError(f"{where} must be a body-region name, got {task!r}.")
    try:
        return network.tasks[network.resolve_task(task)]
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _task_lambda(region: str, lambdas: Mapping[str, float]) -> float:
    """The regularisation prior of ``region`` in ``lambdas``."""
    if not isinstance(lambdas, Mapping):
        raise ValueError(f"lambdas must map body regions to regularisation priors, got {lambdas!r}.")
    if region not in lambdas:
        raise ValueError(
            f"lambdas gives no regularisation prior for the region {region!r} (it has {sorted(lambdas)}); add one, "
            f"e.g. the paper's Table 8: {', '.join(f'{t} {v:g}' for t, v in UNIREG_LAMBDAS.items())}."
        )
    return float(check_positive(lambdas[region], f"lambdas[{region!r}]", allow_zero=True))


def _condition_text(task: str, region: str, reg_type: str) -> str:
    subject = "inter-subject" if reg_type == "inter" else "intra-subject"
    return f"task {task}{f' (nearest region {region})' if task != region else ''}, {subject}"


def unireg_registration(
    network: UniReg,
    task: str = DEFAULT_TASK,
    reg_type: str = DEFAULT_REG_TYPE,
    io_iterations: int = 0,
    similarity: str = "lncc",
    lambdas: Mapping[str, float] = DEFAULT_LAMBDAS,
    io_learning_rate: float = 0.1,
    log: Log | None = print,
) -> ResizedRegistration:
    """``network`` with a fixed condition, as ``registration(moving, fixed) -> ddf`` for pairs of any size.

    The pair ``[B, 1, *S]`` (normalised as in training: CT window [-800, 400] -> [-1, 1], MRI percentiles -> [-1,
    1]) is resized to the network's working size (trilinear, corner-aligned), registered there with the condition
    ``(task, reg_type)`` (paper Sec. 3.3: an unseen anatomy is given its nearest trained region, e.g. lung ->
    chest), and the ``[B, 3, *S]`` field comes back in voxels of the input grid. With ``io_iterations`` the field
    is refined at the working size by field instance optimisation (paper Table 3, "UniReg + IO"): Adam on
    ``similarity + lambda * diffusion`` with ``lambda`` the task's regularisation prior.

    Args:
        network: the UniReg.
        task: a region of ``network.tasks`` or an alias of one (``network.task_aliases``).
        reg_type: ``"inter"`` (two subjects) or ``"intra"`` (one subject, e.g. breathing phases or contrast
            phases).
        io_iterations: instance-optimisation steps per pair (0: the network's field).
        similarity: the instance optimisation's similarity, ``"lncc"`` (NCC, 9^3 box window, the paper's) or
            ``"mind"`` (MIND-SSC).
        lambdas: region -> regularisation prior; the task's region gives the instance optimisation's smoothness.
        io_learning_rate: Adam step size of the instance optimisation, in voxels.
        log: where the condition and the instance optimisation's progress go (``None``: silent).

    Raises:
        ValueError: an unknown task (the message lists the regions and aliases), an unknown ``reg_type`` or
            ``similarity``, a negative ``io_iterations``, or instance optimisation without a prior for the task's
            region.
    """
    region = _region(network, task, "task")
    check_option(reg_type, "reg_type", REGISTRATION_TYPES)
    check_option(similarity, "similarity", UNIREG_SIMILARITIES)
    check_integer(io_iterations, "io_iterations", 0)
    registration: nn.Module = network.conditioned(task, reg_type)
    text = f"UniReg condition: {_condition_text(task, region, reg_type)}"
    if io_iterations:
        smoothness = _task_lambda(region, lambdas)
        registration = FieldOptimised(
            registration, unireg_similarity(similarity), smoothness, io_iterations, io_learning_rate, log
        )
        text += f"; instance optimisation: {io_iterations} steps of {similarity} + {smoothness:g} x diffusion"
    if log is not None:
        log(text)
    return ResizedRegistration(registration, network.input_size)


def dataset_entries(datasets: Sequence[Mapping[str, Any]], network: UniReg) -> list[DatasetEntry]:
    """Check the ``{"json", "task", "reg_type"}`` entries of ``train.yaml`` / ``evaluate.yaml`` against ``network``.

    Args:
        datasets: one mapping per dataset: ``"json"`` (a Learn2Reg ``*_dataset.json``), ``"task"`` (a body region
            of the network or an alias of one) and ``"reg_type"`` (``"inter"`` or ``"intra"``).
        network: the UniReg whose regions the tasks must name.

    Returns:
        the entries, with their dataset names and resolved regions.

    Raises:
        ValueError: naming the entry, for a list that is empty or not a list of mappings, a missing or unknown key,
            an unknown task or registration type, or two datasets with the same name.
    """
    if isinstance(datasets, (str, os.PathLike, Mapping)) or not datasets:
        raise ValueError(
            "datasets must be a non-empty list of {'json': <Learn2Reg *_dataset.json>, 'task': <body region>, "
            f"'reg_type': 'inter' | 'intra'}} entries, got {datasets!r}."
        )
    entries = []
    for index, entry in enumerate(datasets):
        where = f"datasets[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"{where} must be a mapping {{'json': ..., 'task': ..., 'reg_type': ...}} (each dataset needs its "
                f"task and registration type), got {entry!r}."
            )
        missing = [key for key in DATASET_KEYS if key not in entry]
        unknown = sorted(set(entry) - set(DATASET_KEYS))
        if missing or unknown:
            raise ValueError(
                f"{where} {dict(entry)!r} "
                + (f"has no {missing}" if missing else f"has unknown keys {unknown}")
                + f"; each entry has exactly the keys {list(DATASET_KEYS)} (task: one of {list(network.tasks)} or an "
                f"alias, reg_type: one of {list(REGISTRATION_TYPES)})."
            )
        region = _region(network, entry["task"], f"{where}['task']")
        reg_type = check_option(entry["reg_type"], f"{where}['reg_type']", REGISTRATION_TYPES)
        name = read_learn2reg(entry["json"]).name
        entries.append(DatasetEntry(entry["json"], name, entry["task"], region, reg_type))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"datasets: two entries are the same dataset ({names}); list each dataset once.")
    return entries


def _supervised_regions(
    network: UniReg, supervised_tasks: Collection[str] | None, entries: Sequence[DatasetEntry]
) -> tuple[str, ...]:
    """The regions trained with the Dice term: every dataset's region (``None``) or the given tasks' regions."""
    if supervised_tasks is None:
        return tuple(dict.fromkeys(entry.region for entry in entries))
    if isinstance(supervised_tasks, str):
        raise ValueError(f"supervised_tasks must be a list of tasks, got the single string {supervised_tasks!r}.")
    return tuple(
        dict.fromkeys(_region(network, task, f"supervised_tasks[{i}]") for i, task in enumerate(supervised_tasks))
    )


def _validation_pairs(
    entries: Sequence[DatasetEntry], section: str, max_pairs: int | None, logger: logging.Logger
) -> list[dict[str, str]]:
    """The labelled pairs of ``section`` of every dataset (the first ``max_pairs`` of each; 0: none), each tagged
    with its dataset's name (so it is registered with its dataset's condition) and its ``evaluation_labels`` (so
    each dataset is scored over its own labels unless ``validation_labels`` is given)."""
    if max_pairs is not None:
        check_integer(max_pairs, "max_validation_pairs", 0)
    pairs: list[dict[str, str]] = []
    for entry in entries:
        evaluation_labels = read_learn2reg(entry.json).evaluation_labels
        labelled = [
            {**pair, "evaluation_labels": evaluation_labels}
            for pair in load_learn2reg(entry.json, section)
            if "fixed_label" in pair and "moving_label" in pair
        ][:max_pairs]
        if not labelled and max_pairs != 0:
            logger.info("%s has no labelled %s pairs: not validated", entry.name, section)
        pairs.extend(labelled)
    return pairs


def train_workflow(
    datasets: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    lambdas: Mapping[str, float] = DEFAULT_LAMBDAS,
    supervised_tasks: Collection[str] | None = None,
    dice_weight: float = 1.0,
    similarity: str = "lncc",
    optimizer: str = "sgd",
    learning_rate: float = 5e-5,
    momentum: float = 0.99,
    head_learning_rate_scale: float = 30.0,
    epochs: int = 300,
    pairs_per_dataset: int = 100,
    batch_size: int = 1,
    input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
    tasks: Sequence[str] = DEFAULT_TASKS,
    task_aliases: Mapping[str, str] | None = None,
    channels: Sequence[int] = UNIREG_CHANNELS,
    dynamic_head: bool = True,
    feature_extractor: str | nn.Module | None = None,
    extractor_channels: int | None = None,
    ct_window: Sequence[float] = UNIREG_CT_WINDOW,
    init_weights: str | os.PathLike | None = None,
    validation_section: str = "registration_val",
    validation_labels: Sequence[int] | None = None,
    max_validation_pairs: int | None = None,
    resume: bool = True,
    seed: int = 0,
    amp: bool = False,
    device: str | torch.device | None = "auto",
    max_iterations_per_epoch: int | None = None,
    distributed: bool | None = None,
    logger: logging.Logger = LOGGER,
) -> list[dict[str, Any]]:
    """Train UniReg (or fine-tune it) over several datasets, each with its task and registration type.

    Each entry of ``datasets`` is ``{"json": <Learn2Reg *_dataset.json>, "task": <body region>, "reg_type":
    "inter" | "intra"}``. Every epoch draws ``pairs_per_dataset`` random pairs from each dataset (uniform task
    sampling, paper Sec. 4.4), reads them at the working size with CT clipped to ``ct_window`` and mapped to [-1, 1]
    (MRI: [min, 99th percentile] -> [-1, 1]) and trains with :func:`~monai_unireg.engines.train_unireg`: similarity
    + the task's ``lambda`` x diffusion (Eq. 6 with the regularisation prior) + ``dice_weight`` x Dice on the
    labelled pairs of the ``supervised_tasks`` (the optional anatomical knowledge), SGD with momentum (or Adam) at a
    constant rate. ``<output_dir>`` gets ``checkpoint.pt`` and ``model.pt`` after every epoch; a run resumes from
    ``checkpoint.pt`` (refused when it holds another network's settings or other datasets). After every epoch the
    labelled pairs of each dataset's ``validation_section`` are registered with their dataset's condition and
    their mean Dice is logged (at the working size).

    The starting network: a new one (``input_size``, ``tasks``, ``task_aliases``, ``channels``, ``dynamic_head``,
    ``feature_extractor``; initial weights drawn from ``seed``), or with ``init_weights`` (fine-tuning) the network
    of that file, with the configuration stored in it.

    Launched by ``torchrun`` with several processes (or any number and ``distributed=True``), every process joins
    ``torch.distributed`` (:func:`~monai_unireg.engines.workflows.distributed_training`: NCCL on CUDA, each process
    on ``cuda:LOCAL_RANK``; Gloo on the CPU) and trains a ``DistributedDataParallel`` copy on every
    ``WORLD_SIZE``-th pair of each epoch; rank 0 validates, logs and writes the checkpoints.

    Args:
        datasets: the dataset entries (paper: HeadNeck, Chest, Abdomen inter-subject, Liver intra-subject).
        output_dir: folder of ``checkpoint.pt`` and ``model.pt``.
        lambdas: region -> regularisation prior; every trained region needs one (paper Table 8: head_neck 0.05,
            chest 1, abdomen 0.1, liver 10).
        supervised_tasks: tasks (regions or aliases) trained with the Dice term; ``None``: every dataset's task (the
            paper's UniReg uses the masks, Table 2 "W/Dice"); ``[]``: unsupervised.
        dice_weight: weight of the Dice term (ours: 1).
        similarity: ``"lncc"`` (NCC, the paper's) or ``"mind"`` (MIND-SSC).
        optimizer: ``"sgd"`` (the paper's) or ``"adam"``.
        learning_rate: constant learning rate (paper: 5e-5).
        momentum: SGD momentum (paper: 0.99).
        head_learning_rate_scale: the head's rate over the backbone's (ours, see
            :func:`~monai_unireg.engines.train_unireg`).
        epochs: total epochs, resumed ones included.
        pairs_per_dataset: random pairs per dataset per epoch.
        batch_size: pairs per iteration and process (paper: 1).
        input_size: working size of a new network, one size or 3, each a multiple of 8 (paper: 192 x 192 x 160).
        tasks: body regions of a new network's task one-hot.
        task_aliases: unseen anatomy -> region of a new network (``None``: the defaults).
        channels: encoder channels of a new network.
        dynamic_head: ``False``: a new network with one static head (the paper's Table 6 ablation).
        feature_extractor: ``None`` (images only), ``"mind"``, or an ``nn.Module`` ``[B, 1, *S] -> [B, C_f, *S']``
            (e.g. a user's pretrained encoder standing in for the paper's SAM; kept frozen): for a new network, and
            a module again when fine-tuning a network trained with one.
        extractor_channels: ``C_f`` of a module ``feature_extractor``.
        ct_window: HU window of CT images (paper: [-800, 400]).
        init_weights: a ``model.pt`` to fine-tune.
        validation_section: the section of each json validated after every epoch.
        validation_labels: label values of the validation Dice (``None``: each dataset's ``evaluation_labels``, its
            json's or every non-zero label of each fixed map when it names none).
        max_validation_pairs: validate only the first labelled pairs of each dataset (``None``: all; 0: none).
        resume: continue from ``<output_dir>/checkpoint.pt`` when it exists.
        seed: seed of the pair sampler and of a new network's initial weights.
        amp: automatic mixed precision (CUDA only).
        device: training device; ``"auto"``: CUDA when available, else the CPU (under torchrun on CUDA:
            ``cuda:LOCAL_RANK``).
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed: ``None``: join ``torch.distributed`` when torchrun started several processes; ``True``: join it
            even with one process, and refuse to run without torchrun; ``False``: a single process.
        logger: progress output (rank 0).

    Returns:
        the history: one dictionary per epoch (mean ``loss``, ``similarity``, ``smoothness``, ``dice`` when used,
        ``validation_dice`` with validation pairs, ``seconds``, ``epoch``).

    Raises:
        ValueError: a bad dataset entry (not a mapping, a missing key, an unknown task or registration type), a task
            without a regularisation prior, an unknown similarity or optimiser, an invalid size, a checkpoint of
            another run in ``output_dir``, or a distributed setting that does not match the launch.
    """
    check_bool(resume, "resume")
    check_option(similarity, "similarity", UNIREG_SIMILARITIES)
    check_option(optimizer, "optimizer", UNIREG_OPTIMIZERS)
    check_positive(dice_weight, "dice_weight", allow_zero=True)
    if init_weights is None:
        network = _new_network(
            input_size, tasks, task_aliases, channels, dynamic_head, feature_extractor, extractor_channels, seed
        )
    else:
        network = load_unireg(init_weights, feature_extractor if isinstance(feature_extractor, nn.Module) else None)
    entries = dataset_entries(datasets, network)
    priors = {entry.region: _task_lambda(entry.region, lambdas) for entry in entries}
    supervised = _supervised_regions(network, supervised_tasks, entries)
    sampler = PairSampler([entry.json for entry in entries], pairs_per_dataset=pairs_per_dataset, seed=seed)
    pairs = _validation_pairs(entries, validation_section, max_validation_pairs, logger)
    if resume:
        check_resumable(output_dir, network.config, list(sampler.domains))
    with distributed_training(distributed, resolve_device(device)) as run:
        if run.enabled:
            logger.info("process %d of %d (%s) on %s", run.rank, run.world_size, run.backend, run.device)
        network.to(run.device)
        if run.rank == 0:
            logger.info(
                "UniReg%s at %s, %d parameters; datasets %s; lambdas %s; Dice (weight %g) on %s; %s, %s at %g%s; "
                "%d pairs per epoch, %d epochs, batch %d%s; validation on %d %s pairs",
                f", fine-tuning {os.fspath(init_weights)}," if init_weights is not None else "",
                _describe_network(network),
                sum(p.numel() for p in network.parameters()),
                ", ".join(f"{e.name} ({_condition_text(e.task, e.region, e.reg_type)})" for e in entries),
                ", ".join(f"{region} {value:g}" for region, value in priors.items()),
                dice_weight,
                list(supervised) or "no task",
                similarity,
                optimizer,
                learning_rate,
                f" (momentum {momentum:g})" if optimizer == "sgd" else "",
                len(sampler),
                epochs,
                batch_size,
                f" per process on {run.world_size} processes" if run.enabled else "",
                len(pairs),
                validation_section,
            )
        return train_unireg(
            network,
            sampler,
            output_dir,
            epochs,
            {entry.name: (entry.task, entry.reg_type) for entry in entries},
            priors,
            supervised_tasks=supervised,
            dice_weight=dice_weight,
            similarity=similarity,
            optimizer=optimizer,
            learning_rate=learning_rate,
            momentum=momentum,
            head_learning_rate_scale=head_learning_rate_scale,
            batch_size=batch_size,
            ct_window=ct_window,
            validation_pairs=pairs,
            validation_labels=validation_labels,
            device=run.device,
            amp=amp,
            resume=resume,
            seed=seed,
            max_iterations_per_epoch=max_iterations_per_epoch,
            distributed_model=wrap_distributed(network, run),
            log=logger.info,
        )


def _statistics(rows: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> dict[str, float]:
    """``n`` and, with values, ``mean`` and ``std`` (over the pairs) of ``key`` in ``rows``, times ``scale``."""
    values = scale * np.asarray([row[key] for row in rows if row.get(key) is not None], dtype=float)
    if not values.size:
        return {"n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


def _cell(statistics: dict[str, float], spread: bool = True, digits: int = 2) -> str:
    """``"mean ± std"`` (or the mean alone) with ``digits`` decimals (the paper's Table 2: two); ``"n/a"`` without
    values."""
    if not statistics["n"]:
        return "n/a"
    mean = f"{statistics['mean']:.{digits}f}"
    return f"{mean} ± {statistics['std']:.{digits}f}" if spread else mean


def evaluate_unireg(
    network: UniReg,
    datasets: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    section: str = "registration_val",
    modality: str = "auto",
    device: str | torch.device | None = "auto",
    labels: Sequence[int] | None = None,
    ct_window: Sequence[float] = UNIREG_CT_WINDOW,
    intensity_range: Sequence[float] = UNIREG_INTENSITY_RANGE,
    io_iterations: int = 0,
    similarity: str = "lncc",
    lambdas: Mapping[str, float] = DEFAULT_LAMBDAS,
    io_learning_rate: float = 0.1,
    max_pairs: int | None = None,
    log: Log = print,
) -> dict[str, dict[str, Any]]:
    """Register the pairs of several datasets, each with its condition, and tabulate them as the paper's Table 2.

    For each ``{"json", "task", "reg_type"}`` entry (see :func:`dataset_entries`):
    :func:`~monai_unireg.engines.register_pairs` runs :func:`unireg_registration` of the entry's condition on the
    pairs of ``section`` and writes ``<output_dir>/<dataset>/<pair name>/`` (the files of ``inference.yaml``);
    :func:`~monai_unireg.engines.write_table` writes ``<output_dir>/<dataset>/metrics.csv`` and ``summary.json``.
    Then ``<output_dir>/evaluation_table.csv`` and ``evaluation_table.md`` get one row per dataset: its task and
    registration type, the pairs, DSC in % and HD95 in mm (mean ± standard deviation over the pairs with labels),
    SDlogJ and % folding (means over the pairs; the paper reports SDlogJ for inter-subject and % folding for
    intra-subject tasks), and ``evaluation.json`` every mean, standard deviation and count.

    Args:
        network: the UniReg (e.g. :func:`build_unireg`).
        datasets: the dataset entries, one row each.
        output_dir: where everything goes.
        section: the pairs of each json (``registration_val``, ``registration_test``, ...).
        modality: ``"auto"``, ``"ct"`` or ``"mri"`` intensity normalisation.
        device: where the network runs (``"auto"``: CUDA when available).
        labels: label values of each pair's Dice and HD95, the same for every dataset; ``None``: each json's
            ``evaluation_labels`` (its non-zero labels when it names none).
        ct_window: HU window of CT images (paper: [-800, 400]).
        intensity_range: range of the normalised images (paper: [-1, 1]).
        io_iterations: instance-optimisation steps per pair (0: none; see :func:`unireg_registration`).
        similarity: the instance optimisation's similarity.
        lambdas: region -> regularisation prior (the instance optimisation's smoothness).
        io_learning_rate: the instance optimisation's Adam step size.
        max_pairs: only the first pairs of each section (``None``: all).
        log: progress output.

    Returns:
        per dataset name: ``task``, ``region``, ``reg_type``, ``pairs`` and, each as ``{"mean", "std", "n"}``,
        ``dice_percent``, ``hd95_mm``, ``sdlogj`` and ``folding_percent``.

    Raises:
        ValueError: a bad dataset entry, a section without pairs, or an invalid instance-optimisation setting
            (before anything is written).
    """
    entries = dataset_entries(datasets, network)
    if max_pairs is not None:
        check_integer(max_pairs, "max_pairs", 1)
    pairs_of = {}
    for index, entry in enumerate(entries):
        pairs_of[entry.name] = load_learn2reg(entry.json, section)[:max_pairs]
        if not pairs_of[entry.name]:
            raise ValueError(f"datasets[{index}]: {os.fspath(entry.json)} has no {section} pairs to evaluate.")
    registrations = {
        entry.name: unireg_registration(
            network, entry.task, entry.reg_type, io_iterations, similarity, lambdas, io_learning_rate, None
        )
        for entry in entries
    }
    output = Path(output_dir)
    method = f"UniReg + IO ({io_iterations} steps)" if io_iterations else "UniReg"
    results: dict[str, dict[str, Any]] = {}
    table = []
    for entry in entries:
        condition = _condition_text(entry.task, entry.region, entry.reg_type)
        log(f"{entry.name}: {len(pairs_of[entry.name])} {section} pairs, {condition}")
        registration = registrations[entry.name]
        rows = register_pairs(
            lambda shape, registration=registration: registration,
            pairs_of[entry.name],
            output / entry.name,
            modality,
            device,
            labels if labels is not None else read_learn2reg(entry.json).evaluation_labels or None,
            ct_window,
            log,
            intensity_range=intensity_range,
        )
        write_table(rows, output / entry.name / "metrics.csv", output / entry.name / "summary.json")
        result = {
            "task": entry.task,
            "region": entry.region,
            "reg_type": entry.reg_type,
            "pairs": len(rows),
            "dice_percent": _statistics(rows, "dice_mean", 100.0),
            "hd95_mm": _statistics(rows, "hd95_mm_mean"),
            "sdlogj": _statistics(rows, "sdlogj"),
            "folding_percent": _statistics(rows, "folding_percent"),
        }
        results[entry.name] = result
        task = entry.task if entry.task == entry.region else f"{entry.task} ({entry.region})"
        table.append(
            [
                entry.name,
                task,
                entry.reg_type,
                str(len(rows)),
                _cell(result["dice_percent"]),
                _cell(result["hd95_mm"]),
                _cell(result["sdlogj"], spread=False, digits=3),
                _cell(result["folding_percent"], spread=False),
            ]
        )
        log(f"{entry.name}: " + ", ".join(f"{h} {c}" for h, c in zip(TABLE_HEADER[4:], table[-1][4:])))
    write_result_table(
        output / "evaluation_table",
        TABLE_HEADER,
        table,
        f"{method} on the {section} pairs: DSC (%) and HD95 (mm), mean ± standard deviation over the pairs with "
        "labels; SDlogJ and folding (% of voxels with a non-positive Jacobian determinant), means over the pairs.",
    )
    with io.atomic_path(output / "evaluation.json") as temporary:
        temporary.write_text(json.dumps({"method": method, "section": section, "datasets": results}, indent=2))
    return results
