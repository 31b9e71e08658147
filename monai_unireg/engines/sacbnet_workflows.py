"""SACB-Net workflows for the MONAI bundle (``bundles/sacbnet``): build the network for inference, train it.

:func:`build_sacbnet` gives the network ``inference.yaml`` runs (the user's weights, or an untrained network), wrapped
in :class:`~monai_unireg.networks.nets.ResizedRegistration` so that pairs of any size are registered at the
network's working size; :func:`train_workflow` is everything ``train.yaml``, its task files (``ixi.yaml``,
``lpba.yaml``, ``abdomen_ct.yaml``) and ``multi_gpu_train.yaml`` do: training from scratch or fine-tuning from a
weights file, on one process or several (``torchrun``, ``torch.distributed`` with NCCL on CUDA and Gloo on the CPU).

Cheng et al., "SACB-Net: Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025
(``shared/papers/sacbnet.txt``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from monai_unireg.data import PairSampler
from monai_unireg.engines.pair_registration import resolve_device
from monai_unireg.engines.sacbnet import SACBNET_CT_WINDOW, SACBNET_LAMBDAS, train_sacbnet
from monai_unireg.engines.workflows import (
    check_datasets,
    check_resumable,
    distributed_training,
    size_text,
    validation_set,
    working_size,
    wrap_distributed,
)
from monai_unireg.networks.nets import ResizedRegistration
from monai_unireg.networks.nets.sacbnet import SACBNET_CHANNELS, SACBNet, load_sacbnet
from monai_unireg.validation import check_bool, check_integer, check_option, check_positive

__all__ = ["SACBNET_TASKS", "build_sacbnet", "train_workflow"]

LOGGER = logging.getLogger("sacbnet")

#: The paper's three tasks (Sec. 4), the names of the bundle's task files and of :data:`SACBNET_LAMBDAS`.
SACBNET_TASKS = tuple(SACBNET_LAMBDAS)

#: Working size of a new network: the paper's IXI size (Sec. 4), the default of :class:`SACBNet`.
DEFAULT_INPUT_SIZE = (160, 192, 224)


def _new_network(
    input_size: int | Sequence[int],
    num_clusters: int | Sequence[int],
    channels: Sequence[int],
    kmeans_iterations: int,
    kmeans_tolerance: float,
    kmeans_fit_points: int | None,
    seed: int,
) -> SACBNet:
    """A new :class:`SACBNet` whose initial weights are drawn from ``seed`` (the global random state is kept)."""
    check_integer(seed, "seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SACBNet(
            working_size(input_size, 16),
            channels=channels,
            num_clusters=num_clusters,
            kmeans_iterations=kmeans_iterations,
            kmeans_tolerance=kmeans_tolerance,
            kmeans_fit_points=kmeans_fit_points,
            seed=seed,
        )


def build_sacbnet(
    weights: str | os.PathLike | None,
    input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
    num_clusters: int | Sequence[int] = 7,
    channels: Sequence[int] = SACBNET_CHANNELS,
    kmeans_iterations: int = 50,
    kmeans_tolerance: float = 1e-4,
    kmeans_fit_points: int | None = None,
    seed: int = 0,
    logger: logging.Logger = LOGGER,
) -> ResizedRegistration:
    """The SACB-Net network of ``inference.yaml``: ``network(moving, fixed) -> ddf`` for pairs of any size.

    The network takes ``[B, 1, *S]`` moving and fixed images in [0, 1] on one grid of any size ``S``, resizes them
    to its working size (trilinear, corner-aligned; the paper's sizes are multiples of 16), registers them there
    and returns the ``[B, 3, *S]`` displacement in voxels of the input grid (MONAI ``Warp`` convention, values
    rescaled by :func:`~monai_unireg.spatial.resize_ddf`), so the field lands on each fixed image's own grid.

    Args:
        weights: a ``model.pt`` / ``checkpoint.pt`` of :func:`train_workflow` (or a bare state dict of the default
            network), loaded by :func:`~monai_unireg.networks.nets.load_sacbnet` with its own configuration
            (working size, channels, clusters, K-Means settings); the other arguments are then ignored. ``None``:
            a new network from them, **untrained** (weights drawn from ``seed``): its fields are meaningless and a
            warning says so.
        input_size: working size without weights, one size or 3, each a multiple of 16 (paper Sec. 4: IXI
            160x192x224, LPBA 160x192x160, abdomen CT 192x160x224).
        num_clusters: K-Means clusters ``N`` of every SACB, or one per level 1/16 .. 1/2 (paper: 7).
        channels: encoder channels at levels 1 .. 1/16 (paper Fig. 2: 8, 16, 32, 64, 64).
        kmeans_iterations: Lloyd iteration cap of the K-Means (ours: 50; the reference code runs to convergence).
        kmeans_tolerance: K-Means stopping tolerance (largest centroid move).
        kmeans_fit_points: K-Means fits on at most this many evenly spaced voxels, then labels all of them
            (``None``, the default: all voxels, as the reference code).
        seed: K-Means seed and, without weights, the seed of the initial weights.
        logger: where the warning and the description of the loaded network go.

    Raises:
        ValueError: an unreadable or mismatched weights file, or an invalid size, channels or cluster count.
    """
    if weights is None:
        network = _new_network(
            input_size, num_clusters, channels, kmeans_iterations, kmeans_tolerance, kmeans_fit_points, seed
        )
        logger.warning(
            "no weights given: the SACB-Net network is untrained (random weights drawn from seed %d), so its "
            "displacement fields are meaningless, not a registration; pass --weights PATH (a model.pt of "
            "train.yaml).",
            seed,
        )
    else:
        network = load_sacbnet(weights)
        logger.info(
            "loaded %s: working size %s, channels %s, %s clusters",
            os.fspath(weights),
            size_text(network.input_size),
            network.config["channels"],
            network.config["num_clusters"],
        )
    return ResizedRegistration(network, network.input_size)


def _initial_network(
    input_size: int | Sequence[int],
    num_clusters: int | Sequence[int],
    channels: Sequence[int],
    kmeans_iterations: int,
    kmeans_tolerance: float,
    kmeans_fit_points: int | None,
    seed: int,
    init_weights: str | os.PathLike | None,
) -> SACBNet:
    """The network training starts from (see :func:`train_workflow`)."""
    if init_weights is None:
        return _new_network(
            input_size, num_clusters, channels, kmeans_iterations, kmeans_tolerance, kmeans_fit_points, seed
        )
    network = load_sacbnet(init_weights)
    size = working_size(input_size, 16)
    if network.input_size == size:
        return network
    resized = SACBNet(**{**network.config, "input_size": size})  # the weights do not depend on the size
    resized.load_state_dict(network.state_dict())
    return resized


def train_workflow(
    datasets: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    task: str | None = None,
    epochs: int = 300,
    pairs_per_dataset: int = 400,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    lam: float | None = None,
    dice_weight: float = 0.0,
    dice_labels: Sequence[int] | None = None,
    lncc_window: int = 9,
    power: float = 0.9,
    ct_window: Sequence[float] = SACBNET_CT_WINDOW,
    input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
    num_clusters: int | Sequence[int] = 7,
    channels: Sequence[int] = SACBNET_CHANNELS,
    kmeans_iterations: int = 50,
    kmeans_tolerance: float = 1e-4,
    kmeans_fit_points: int | None = None,
    init_weights: str | os.PathLike | None = None,
    validation_json: str | os.PathLike | None = None,
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
    """Train SACB-Net (or fine-tune it) with its objective (paper Eq. 1): LNCC + lambda * diffusion (+ Dice).

    Every epoch draws ``pairs_per_dataset`` random pairs from each dataset (:class:`~monai_unireg.data.PairSampler`,
    seeded by ``seed``: ordered pairs of distinct training cases for inter-subject data, the listed
    ``training_paired_images`` of a paired dataset, e.g. atlas-subject pairs), reads them as ``[1, *input_size]``
    images in [0, 1] (CT: ``ct_window``; MRI: [min, 99th percentile]) and takes Adam steps on batches of
    ``batch_size`` pairs with the polynomial learning-rate decay stepped every iteration
    (:func:`~monai_unireg.engines.train_sacbnet`); ``<output_dir>/checkpoint.pt`` and ``model.pt`` are written after
    every epoch, and a run resumes from ``checkpoint.pt`` (refused when it holds another network's settings).

    The starting network: a new one (``input_size``, ``channels``, ``num_clusters``, K-Means settings; initial
    weights drawn from ``seed``), or with ``init_weights`` (fine-tuning) the network of that file, with its
    channels, clusters and K-Means settings, at the working size ``input_size`` (SACB-Net's weights do not depend
    on the size, so a network trained on one task can be fine-tuned at another task's size).

    Launched by ``torchrun`` with several processes (or any number and ``distributed=True``), every process joins
    ``torch.distributed`` (:func:`~monai_unireg.engines.workflows.distributed_training`: NCCL on CUDA, each
    process on ``cuda:LOCAL_RANK``; Gloo on the CPU) and trains a ``DistributedDataParallel`` copy on every
    ``WORLD_SIZE``-th pair of each epoch with ``batch_size`` pairs per process; rank 0 validates, logs and writes
    the checkpoints.

    Args:
        datasets: Learn2Reg ``*_dataset.json`` paths.
        output_dir: folder of ``checkpoint.pt`` and ``model.pt``.
        task: the paper's task (one of :data:`SACBNET_TASKS`: ``"ixi"``, ``"lpba"``, ``"abdomen_ct"``), or
            ``None``; it gives ``lam`` when that is ``None`` and names the run in the log.
        epochs: total epochs, resumed epochs included (reference code: 300).
        pairs_per_dataset: random pairs per dataset per epoch.
        batch_size: pairs per iteration and process (paper Sec. 4: 1).
        learning_rate: initial Adam learning rate (paper Sec. 4: 1e-4).
        lam: diffusion weight lambda of Eq. 1; ``None``: the task's (:data:`SACBNET_LAMBDAS`: IXI 3, LPBA 1,
            abdomen CT 0.4).
        dice_weight: weight of the soft Dice term on labelled training pairs (0: unsupervised, as the paper).
        dice_labels: label values of that term (``None``: every non-zero label of the pair).
        lncc_window: side of the LNCC box window (reference code: 9).
        power: exponent of the polynomial decay (reference code: 0.9).
        ct_window: HU window of CT images, mapped to [0, 1] (paper Sec. 4: [-1000, 1000]).
        input_size: working size, one size or 3, each a multiple of 16 (paper Sec. 4: IXI 160x192x224, LPBA
            160x192x160, abdomen CT 192x160x224).
        num_clusters: K-Means clusters of every SACB, or one per level 1/16 .. 1/2 (paper: 7).
        channels: encoder channels at levels 1 .. 1/16 (paper: 8, 16, 32, 64, 64).
        kmeans_iterations: Lloyd iteration cap (ours: 50).
        kmeans_tolerance: K-Means stopping tolerance.
        kmeans_fit_points: K-Means fit points per image and level (``None``, the default: all voxels).
        init_weights: a weights file to fine-tune from.
        validation_json: a Learn2Reg json whose labelled pairs are scored (mean Dice) after every epoch.
        validation_section: its section scored.
        validation_labels: label values of that Dice; ``None``: the json's ``evaluation_labels`` (all non-zero
            labels of each fixed map when it names none).
        max_validation_pairs: score only the first pairs of the section (``None``: all).
        resume: continue from ``<output_dir>/checkpoint.pt`` when it exists.
        seed: seed of the pair sampler, the initial weights and the K-Means of a new network.
        amp: automatic mixed precision (CUDA only).
        device: training device; ``"auto"``: CUDA when available, else the CPU (under torchrun on CUDA:
            ``cuda:LOCAL_RANK``).
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed: ``None``: join ``torch.distributed`` when torchrun started several processes; ``True``: join
            it even with one process, and refuse to run without torchrun; ``False``: a single process (refused when
            torchrun started several).
        logger: progress output (rank 0).

    Returns:
        the history: one dictionary per epoch (mean ``loss``, ``similarity``, ``diffusion``, ``dice`` when used,
        ``learning_rate``, ``validation_dice`` with validation pairs, ``seconds``, ``epoch``).

    Raises:
        ValueError: an unknown ``task``, neither ``lam`` nor ``task``, an invalid size, unlabelled validation pairs,
            a checkpoint of another network in ``output_dir``, or a distributed setting that does not match the
            launch.
    """
    if task is not None:
        check_option(task, "task", SACBNET_TASKS)
    if lam is None:
        if task is None:
            raise ValueError(
                "lam is None and no task is given: give lam (the diffusion weight of Eq. 1) or task, whose lambda "
                f"is then used ({', '.join(f'{name}: {value:g}' for name, value in SACBNET_LAMBDAS.items())})."
            )
        lam = SACBNET_LAMBDAS[task]
    check_positive(lam, "lam", allow_zero=True)
    check_positive(dice_weight, "dice_weight", allow_zero=True)
    check_bool(resume, "resume")
    datasets = check_datasets(datasets)
    with distributed_training(distributed, resolve_device(device)) as run:
        if run.enabled:
            logger.info("process %d of %d (%s) on %s", run.rank, run.world_size, run.backend, run.device)
        network = _initial_network(
            input_size,
            num_clusters,
            channels,
            kmeans_iterations,
            kmeans_tolerance,
            kmeans_fit_points,
            seed,
            init_weights,
        )
        if resume:
            check_resumable(output_dir, network.config)
        network.to(run.device)
        sampler = PairSampler(datasets, pairs_per_dataset=pairs_per_dataset, seed=seed)
        pairs, validation_labels = validation_set(
            validation_json, validation_section, max_validation_pairs, validation_labels
        )
        if run.rank == 0:
            if dice_weight > 0 and not any(
                "moving_label" in p and "fixed_label" in p for p in sampler.pairs_for_epoch(0)
            ):
                logger.warning(
                    "dice_weight is %g, but no training pair has both label maps: no Dice term.", dice_weight
                )
            logger.info(
                "SACB-Net%s%s at %s, channels %s, %s clusters, %d parameters; %d pairs per epoch from %s, %d epochs, "
                "batch %d%s, lambda %g, Dice weight %g",
                f" ({task})" if task else "",
                f", fine-tuning {os.fspath(init_weights)}," if init_weights is not None else "",
                size_text(network.input_size),
                network.config["channels"],
                network.config["num_clusters"],
                sum(p.numel() for p in network.parameters()),
                len(sampler),
                list(sampler.domains),
                epochs,
                batch_size,
                f" per process on {run.world_size} processes" if run.enabled else "",
                lam,
                dice_weight,
            )
        return train_sacbnet(
            network,
            sampler,
            output_dir,
            epochs,
            lam=lam,
            dice_weight=dice_weight,
            learning_rate=learning_rate,
            power=power,
            batch_size=batch_size,
            dice_labels=dice_labels,
            lncc_window=lncc_window,
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
