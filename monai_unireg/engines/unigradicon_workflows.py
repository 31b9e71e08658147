"""uniGradICON workflows for the MONAI bundle (``bundles/unigradicon``): train the network.

``inference.yaml`` builds its network from MONAI parts (a ``PairInput`` network_def, ``SupervisedEvaluator``);
:func:`train_workflow` is everything ``train.yaml`` and
``multi_gpu_train.yaml`` do: stage 1, stage 2 from a stage-1 network, fine-tuning from any weights file, on one
process or several (``torchrun``, ``torch.distributed`` with NCCL on CUDA and Gloo on the CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from monai_unireg.data import PairSampler
from monai_unireg.engines.pair_registration import resolve_device
from monai_unireg.engines.unigradicon import (
    GradICONObjective,
    RandomPairAugmentation,
    stage_two_from_stage_one,
    train_unigradicon,
)
from monai_unireg.engines.workflows import (
    check_datasets,
    distributed_training,
    load_validation_pairs,
    size_text,
    validation_set,
    wrap_distributed,
)
from monai_unireg.networks.nets.unigradicon import (
    PUBLISHED_DOWN_CHANNELS,
    PUBLISHED_UP_CHANNELS,
    UniGradICON,
    load_unigradicon,
)
from monai_unireg.validation import check_bool, check_option

__all__ = ["train_workflow", "load_validation_pairs"]

LOGGER = logging.getLogger("unigradicon")


def _initial_network(
    stage: int,
    input_size: int | Sequence[int],
    down_channels: Sequence[int],
    up_channels: Sequence[int],
    stage1_weights: str | os.PathLike | None,
    init_weights: str | os.PathLike | None,
) -> UniGradICON:
    """The network training starts from (see :func:`train_workflow`)."""
    if stage1_weights is not None and init_weights is not None:
        raise ValueError(
            "give stage1_weights (stage 2 from a stage-1 network) or init_weights (fine-tuning), not both."
        )
    if init_weights is not None:
        network = load_unigradicon(init_weights)
        if network.include_step2 != (stage == 2):
            raise ValueError(
                f"init_weights {os.fspath(init_weights)!r} holds a {len(network.unets)}-UNet (stage "
                f"{2 if network.include_step2 else 1}) network, but stage is {stage}; pass --stage "
                f"{2 if network.include_step2 else 1} to fine-tune it."
            )
        return network
    if stage == 1:
        if stage1_weights is not None:
            raise ValueError("stage1_weights initialises stage 2; with stage 1 leave it null (or use init_weights).")
        return UniGradICON(input_size, include_step2=False, down_channels=down_channels, up_channels=up_channels)
    if stage1_weights is None:
        raise ValueError(
            "stage 2 needs stage1_weights: the model.pt written by stage 1 (e.g. --stage1_weights "
            "models/stage1/model.pt); to fine-tune a 4-UNet network instead, give init_weights."
        )
    stage_one = load_unigradicon(stage1_weights)
    if stage_one.include_step2:
        raise ValueError(
            f"stage1_weights {os.fspath(stage1_weights)!r} holds a 4-UNet (stage 2) network; stage 2 starts from "
            "a 3-UNet stage-1 network. To fine-tune a 4-UNet network, give it as init_weights."
        )
    return stage_two_from_stage_one(stage_one)


def train_workflow(
    datasets: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    stage: int = 1,
    epochs: int = 800,
    pairs_per_dataset: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 5e-5,
    lam: float = 1.5,
    lncc_sigma: float = 5.0,
    squared_lncc: bool = False,
    augmentation_noise_std: float = 0.05,
    permute_flip: bool = True,
    input_size: int | Sequence[int] = 175,
    down_channels: Sequence[int] = PUBLISHED_DOWN_CHANNELS,
    up_channels: Sequence[int] = PUBLISHED_UP_CHANNELS,
    stage1_weights: str | os.PathLike | None = None,
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
    """Train uniGradICON (stage 1 or 2) or fine-tune it, with the GradICON objective (paper Eq. 1).

    Every epoch draws ``pairs_per_dataset`` random pairs from each dataset (:class:`~monai_unireg.data.PairSampler`,
    seeded by ``seed``), reads them as ``[1, *input_size]`` images in [0, 1], augments them
    (:class:`~monai_unireg.engines.RandomPairAugmentation`) and takes Adam steps on batches of ``[batch_size, 1,
    *input_size]``; ``<output_dir>/checkpoint.pt`` and ``model.pt`` are written after every epoch, and a run
    resumes from ``checkpoint.pt`` (see :func:`~monai_unireg.engines.train_unigradicon`).

    The starting network:

    - stage 1: a new 3-UNet network (``input_size``, channels);
    - stage 2: the 3 UNets of ``stage1_weights`` plus a new fourth one (identity at first);
    - ``init_weights`` (fine-tuning, either stage): the network of that file (its own size and channels; the
      released ``Step_2_final.trch`` is a stage-2 network), trained further on ``datasets``.

    Launched by ``torchrun`` with several processes (``WORLD_SIZE`` > 1 in the environment), or with any number
    and ``distributed=True``, every process joins ``torch.distributed`` (NCCL on CUDA, each process on
    ``cuda:LOCAL_RANK``; Gloo on the CPU; a process group the caller started is used and left open), trains a
    ``DistributedDataParallel(network, static_graph=True)`` copy (the weights serve both directions of a pair)
    on every ``WORLD_SIZE``-th pair of each epoch with ``batch_size`` pairs per process; rank 0 validates, logs and
    writes the checkpoints (see :func:`train_unigradicon`: each process has its own augmentation and jitter
    streams, and the epoch is cut to a multiple of the number of processes).

    Args:
        datasets: Learn2Reg ``*_dataset.json`` paths (paper: lung CT, knee MRI, brain MRI, abdomen CT).
        output_dir: folder of ``checkpoint.pt`` and ``model.pt``.
        stage: 1 or 2 (paper Sec. 2.2/2.3).
        epochs: total epochs, resumed epochs included (paper: 800 for stage 1, 200 for stage 2).
        pairs_per_dataset: random pairs per dataset per epoch (paper Sec. 2.3: 1000).
        batch_size: pairs per iteration and process (reference code: 4 per GPU).
        learning_rate: Adam learning rate (paper Sec. 2.3: 5e-5).
        lam: GradICON weight lambda (paper Sec. 2.3: 1.5).
        lncc_sigma: LNCC Gaussian window in voxels (reference code: 5).
        squared_lncc: ``1 - mean(LNCC^2)``, for multimodal pairs (paper Sec. 4).
        augmentation_noise_std: std of the random affine perturbation (reference code: 0.05).
        permute_flip: random axis permutations and flips (reference code: on).
        input_size: working size of a new network (paper Sec. 2.1: 175).
        down_channels: encoder channels of a new network's UNets (published: 16, 32, 64, 256, 512).
        up_channels: decoder channels of a new network's UNets (published: 16, 32, 64, 128, 256).
        stage1_weights: ``model.pt`` of stage 1; required by stage 2 (without ``init_weights``).
        init_weights: any weights file to fine-tune from.
        validation_json: a Learn2Reg json whose labelled pairs are scored (mean Dice) after every epoch.
        validation_section: its section scored.
        validation_labels: label values of that Dice; ``None``: the json's ``evaluation_labels`` (all non-zero
            labels of each fixed map when it names none).
        max_validation_pairs: score only the first pairs of the section (``None``: all).
        resume: continue from ``<output_dir>/checkpoint.pt`` when it exists.
        seed: seed of the pair sampler, the augmentation and the GradICON jitter.
        amp: automatic mixed precision (CUDA only).
        device: training device; ``"auto"``: CUDA when available, else the CPU (under torchrun on CUDA:
            ``cuda:LOCAL_RANK``).
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed: ``None``: join ``torch.distributed`` when torchrun started several processes; ``True``:
            join it even with one process, and refuse to run without torchrun; ``False``: a single process
            (refused when torchrun started several).
        logger: progress output (rank 0).

    Returns:
        the history: one dictionary per epoch (mean loss, similarity and GradICON terms, validation Dice,
        seconds, epoch).

    Raises:
        ValueError: an invalid ``stage``, stage 2 without ``stage1_weights``, weights of the wrong stage,
            unlabelled validation pairs, or a distributed setting that does not match the launch.
    """
    check_option(stage, "stage", (1, 2))
    check_bool(resume, "resume")
    check_bool(squared_lncc, "squared_lncc")
    datasets = check_datasets(datasets)
    with distributed_training(distributed, resolve_device(device)) as run:
        if run.enabled:
            logger.info("process %d of %d (%s) on %s", run.rank, run.world_size, run.backend, run.device)
        network = _initial_network(stage, input_size, down_channels, up_channels, stage1_weights, init_weights)
        network.to(run.device)
        sampler = PairSampler(datasets, pairs_per_dataset=pairs_per_dataset, seed=seed)
        pairs, validation_labels = validation_set(
            validation_json, validation_section, max_validation_pairs, validation_labels
        )
        if run.rank == 0:
            logger.info(
                "uniGradICON stage %d: %d UNets at %s, %d pairs per epoch from %s, %d epochs, batch %d%s",
                stage,
                len(network.unets),
                size_text(network.input_size),
                len(sampler),
                list(sampler.domains),
                epochs,
                batch_size,
                f" per process on {run.world_size} processes" if run.enabled else "",
            )
        return train_unigradicon(
            network,
            sampler,
            output_dir,
            epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            objective=GradICONObjective(lam=lam, sigma=lncc_sigma, squared=squared_lncc),
            augmentation=RandomPairAugmentation(augmentation_noise_std, permute_flip),
            validation_pairs=pairs,
            validation_labels=validation_labels,
            device=run.device,
            amp=amp,
            resume=resume,
            seed=seed,
            max_iterations_per_epoch=max_iterations_per_epoch,
            distributed_model=wrap_distributed(network, run, static_graph=True),
            log=logger.info,
        )
