"""UniReg training: one network over several tasks, each with its own regularisation prior and optional labels.

Li et al., "UniReg" (``shared/papers/unireg.txt``, Sec. 3.2, 4.3, Table 8): ``L = L_sim(F, M o phi) + lambda_task
L_reg(phi)`` (Eq. 6) with the regularisation prior ``lambda_task`` of the pair's task (HeadNeck 0.05, Chest 1,
Abdomen 0.1, Liver 10), plus a Dice loss on the segmentation masks of the tasks that provide them ("optional
anatomical knowledge"); NCC similarity and diffusion regulariser (the losses the paper gives SAME "as in UniReg");
tasks sampled uniformly (one dataset per task, the same number of pairs from each per epoch); SGD with momentum
0.99 at a learning rate of 5e-5 (Adam as an option); batch 1; CT clipped to HU [-800, 400] and mapped to [-1, 1].
The loop is :func:`~monai_unireg.engines.train_registration`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.training import (
    Augmentation,
    Batch,
    Log,
    LossTerms,
    PairLoader,
    train_registration,
)
from monai_unireg.losses import LNCCLoss, MINDSSCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets.unireg import REGISTRATION_TYPES, UniReg, load_unireg
from monai_unireg.validation import check_option, check_positive

__all__ = [
    "UNIREG_DEFAULTS",
    "UNIREG_CT_WINDOW",
    "UNIREG_INTENSITY_RANGE",
    "UNIREG_LAMBDAS",
    "UNIREG_OPTIMIZERS",
    "UNIREG_SIMILARITIES",
    "UniRegObjective",
    "UniRegPairLoader",
    "train_unireg",
    "unireg_similarity",
]

#: HU window of UniReg's CT preprocessing, mapped to :data:`UNIREG_INTENSITY_RANGE` (paper Sec. 4.3).
UNIREG_CT_WINDOW = (-800.0, 400.0)
UNIREG_INTENSITY_RANGE = (-1.0, 1.0)

#: UniReg's defaults (one home for the command line, the bundle and the trainer).
UNIREG_DEFAULTS = MethodDefaults(
    name="unireg",
    working_size=(192, 192, 160),
    size_multiple=8,
    ct_window=UNIREG_CT_WINDOW,
    intensity_range=UNIREG_INTENSITY_RANGE,
    load_weights=load_unireg,
    io_learning_rate=0.1,
    sources={
        "working_size": "paper Sec. 4.1",
        "ct_window": "paper Sec. 4.3",
        "intensity_range": "paper Sec. 4.3",
        "io_learning_rate": "ours (the paper gives no step count)",
    },
)
#: Regularisation priors of the paper's training tasks (Table 8).
UNIREG_LAMBDAS = {"head_neck": 0.05, "chest": 1.0, "abdomen": 0.1, "liver": 10.0}
UNIREG_SIMILARITIES = ("lncc", "mind")
UNIREG_OPTIMIZERS = ("sgd", "adam")


def unireg_similarity(name: str, reduction: str = "mean") -> nn.Module:
    """UniReg's similarity loss ``(warped, fixed)``: ``"lncc"``, :class:`~monai_unireg.losses.LNCCLoss` on a 9^3 box
    window (NCC, the paper's); ``"mind"``, :class:`~monai_unireg.losses.MINDSSCLoss` (radius 2, dilation 2; the
    paper's suggestion for MR and multimodal pairs). ``reduction`` as those losses' (``"none"``: per voxel)."""
    check_option(name, "similarity", UNIREG_SIMILARITIES)
    if name == "lncc":
        return LNCCLoss(spatial_dims=3, kernel_type="box", kernel_size=9, reduction=reduction)
    return MINDSSCLoss(radius=2, dilation=2, reduction=reduction)


class UniRegPairLoader(PairLoader):
    """:class:`~monai_unireg.engines.PairLoader` (CT window [-800, 400] -> [-1, 1]) that adds each pair's condition.

    The pair's ``"task"`` and ``"reg_type"`` names, when it has them, or else those of its ``"dataset"`` in
    ``dataset_conditions``, become int64 scalars ``"task"`` (index in ``network.tasks``, aliases resolved) and
    ``"reg_type"`` (index in :data:`~monai_unireg.networks.nets.unireg.REGISTRATION_TYPES`).

    Args:
        network: the UniReg (its ``input_size`` and task list).
        dataset_conditions: dataset name -> ``(task, reg_type)``.
        ct_window: HU window of CT images.
        intensity_range: output range of the normalisation.
    """

    def __init__(
        self,
        network: UniReg,
        dataset_conditions: Mapping[str, tuple[str, str]],
        ct_window: Sequence[float] = UNIREG_CT_WINDOW,
        intensity_range: Sequence[float] = UNIREG_INTENSITY_RANGE,
    ) -> None:
        super().__init__(network.input_size, ct_window, intensity_range)
        self.conditions = {
            str(name): (
                network.resolve_task(task),
                REGISTRATION_TYPES.index(check_option(kind, "reg_type", REGISTRATION_TYPES)),
            )
            for name, (task, kind) in dataset_conditions.items()
        }
        self.network = network

    def condition(self, pair: Mapping[str, Any]) -> tuple[int, int]:
        """``(task index, reg_type index)`` of ``pair``."""
        if "task" in pair and "reg_type" in pair:
            kind = check_option(pair["reg_type"], "reg_type", REGISTRATION_TYPES)
            return self.network.resolve_task(pair["task"]), REGISTRATION_TYPES.index(kind)
        name = pair.get("dataset")
        if name not in self.conditions:
            raise ValueError(
                f"pair {pair.get('fixed_image')} has no 'task' and 'reg_type' and its dataset {name!r} is not among "
                f"the datasets with a condition {sorted(self.conditions)}."
            )
        return self.conditions[name]

    def __call__(self, pair: dict[str, Any]) -> Batch:
        item = super().__call__(pair)
        task, kind = self.condition(pair)
        item["task"] = torch.tensor(task)
        item["reg_type"] = torch.tensor(kind)
        return item


class UniRegObjective(nn.Module):
    r"""UniReg's training loss (paper Eq. 6 with the task priors and the optional Dice term), per sample.

    .. math::

        L_i = L_{sim}(I_m \circ \phi_i, I_f) + \lambda_{t_i} L_{reg}(u_i) + w \, [t_i \in S] \, L_{Dice}(u_i)

    averaged over the batch, with ``t_i`` the sample's task, ``lambda_t`` its prior, ``S`` the tasks with label
    supervision (the Dice term also needs both label maps in the batch), :func:`~monai_unireg.losses.
    diffusion_regularisation` as ``L_reg`` and :func:`~monai_unireg.losses.soft_dice_loss`. Similarity ``"lncc"``:
    :class:`~monai_unireg.losses.LNCCLoss` on a 9^3 box window (NCC, the paper's); ``"mind"``:
    :class:`~monai_unireg.losses.MINDSSCLoss` (the paper's suggestion for MR and multimodal pairs).

    Args:
        tasks: the network's task names (the order of its indices).
        lambdas: task -> ``lambda`` (every task that is trained needs one).
        supervised_tasks: tasks whose pairs add the Dice term.
        dice_weight: ``w``.
        similarity: ``"lncc"`` or ``"mind"``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        lambdas: Mapping[str, float],
        supervised_tasks: Collection[str] = (),
        dice_weight: float = 1.0,
        similarity: str = "lncc",
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        unknown = sorted(set(lambdas) - set(self.tasks)) + sorted(set(supervised_tasks) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"lambdas and supervised_tasks name tasks {unknown} that are not among {list(self.tasks)}."
            )
        self.lambdas = {
            task: float(check_positive(value, f"lambdas[{task!r}]", allow_zero=True)) for task, value in lambdas.items()
        }
        self.supervised = frozenset(supervised_tasks)
        self.dice_weight = float(check_positive(dice_weight, "dice_weight", allow_zero=True))
        self.similarity_loss = unireg_similarity(similarity, reduction="none")

    def task_lambda(self, task: str) -> float:
        """``lambda`` of ``task`` (a clear error when the configuration gives none)."""
        if task not in self.lambdas:
            raise ValueError(f"no regularisation prior for task {task!r}: lambdas gives {sorted(self.lambdas)}.")
        return self.lambdas[task]

    def forward(self, model: nn.Module, batch: Batch) -> LossTerms:
        """Loss of ``model`` (a :class:`UniReg` or its ``DistributedDataParallel`` wrapper) on ``batch`` (with
        ``"task"`` and ``"reg_type"`` indices, as :class:`UniRegPairLoader` gives)."""
        if "task" not in batch or "reg_type" not in batch:
            raise ValueError("the batch has no 'task' / 'reg_type': read the pairs with UniRegPairLoader.")
        moving, fixed = batch["moving"], batch["fixed"]
        tasks = batch["task"].long().view(-1)
        ddf = model(moving, fixed, tasks, batch["reg_type"].long().view(-1))
        per_voxel = self.similarity_loss(spatial.warp(moving, ddf), fixed)
        similarity = per_voxel.flatten(1).mean(dim=1)
        smoothness = torch.stack([diffusion_regularisation(ddf[i : i + 1]) for i in range(ddf.shape[0])])
        names = [self.tasks[int(t)] for t in tasks]
        lambdas = torch.tensor([self.task_lambda(name) for name in names], device=ddf.device, dtype=smoothness.dtype)
        total = (similarity + lambdas * smoothness).mean()
        parts = {"similarity": similarity.mean(), "smoothness": smoothness.mean()}
        has_labels = "moving_label" in batch and "fixed_label" in batch
        supervised = [i for i, name in enumerate(names) if has_labels and name in self.supervised]
        if supervised and self.dice_weight > 0:
            dice = torch.stack(
                [
                    soft_dice_loss(batch["moving_label"][i : i + 1], batch["fixed_label"][i : i + 1], ddf[i : i + 1])
                    for i in supervised
                ]
            )
            total = total + self.dice_weight * dice.sum() / ddf.shape[0]
            parts["dice"] = dice.mean()
        return LossTerms(total, **parts)


def train_unireg(
    network: UniReg,
    sampler: PairSampler,
    output_dir: str | os.PathLike,
    epochs: int,
    dataset_conditions: Mapping[str, tuple[str, str]],
    lambdas: Mapping[str, float],
    supervised_tasks: Collection[str] = (),
    dice_weight: float = 1.0,
    similarity: str = "lncc",
    optimizer: str = "sgd",
    learning_rate: float = 5e-5,
    momentum: float = 0.99,
    head_learning_rate_scale: float = 30.0,
    batch_size: int = 1,
    augmentation: Augmentation | None = None,
    ct_window: Sequence[float] = UNIREG_CT_WINDOW,
    validation_pairs: Sequence[dict[str, Any]] = (),
    validation_labels: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    resume: bool = True,
    seed: int = 0,
    max_iterations_per_epoch: int | None = None,
    distributed_model: nn.Module | None = None,
    log: Log = print,
) -> list[dict[str, float]]:
    """Train (or fine-tune) UniReg with :class:`UniRegObjective` over the datasets of ``sampler``, one task each.

    :func:`~monai_unireg.engines.train_registration` with SGD (momentum 0.99) or Adam at a constant rate, pairs read
    by :class:`UniRegPairLoader` at ``network.input_size``; ``checkpoint.pt`` and ``model.pt`` after every epoch,
    exact resume. Validation pairs need a ``"dataset"`` of ``dataset_conditions`` (or their own ``"task"`` and
    ``"reg_type"``): the network is validated with their conditions.

    Args:
        network: the network (``dynamic_head=False`` trains the static-head ablation).
        sampler: pairs per epoch; each of its datasets must be in ``dataset_conditions``.
        output_dir: checkpoint folder.
        epochs: total epochs, resumed ones included.
        dataset_conditions: dataset name -> ``(task, reg_type)``, e.g. ``{"BrainSynth": ("brain", "inter")}``.
        lambdas: task -> regularisation prior (paper Table 8: :data:`UNIREG_LAMBDAS`).
        supervised_tasks: tasks trained with the Dice term (their pairs need labels).
        dice_weight: weight of the Dice term.
        similarity: ``"lncc"`` (NCC, the paper's) or ``"mind"``.
        optimizer: ``"sgd"`` (momentum ``momentum``, the paper's) or ``"adam"``.
        learning_rate: initial rate (paper: 5e-5).
        momentum: SGD momentum (paper: 0.99).
        head_learning_rate_scale: the dynamic head's controller (or the static head) learns at this multiple of
            ``learning_rate`` (ours; the paper gives one rate). Its 1x1x1 layers have a fan-in of 8, so at the
            backbone's rate the field grows from its near-zero start about 50 times more slowly than through a
            VoxelMorph-style 3x3x3 head on 16 channels; overfitting one ProstateMRUS pair at 32^3 with Adam at 1e-3,
            the loss went 1.82 -> 1.77 in 60 steps with 1 and 1.82 -> 1.29 with 10 (a common rate of 5e-3 diverges);
            the short-training benchmark and the tests use 30 with Adam at 1e-4.
        batch_size: pairs per iteration and process (paper: 1).
        augmentation: ``augmentation(batch, generator) -> batch`` (paper: none).
        ct_window: HU window of CT images ([-800, 400], mapped to [-1, 1]).
        validation_pairs: labelled pairs scored (mean Dice at the working size) after every epoch.
        validation_labels: label values of that Dice (``None``: all non-zero labels).
        device: training device.
        amp: automatic mixed precision (CUDA only).
        resume: continue from ``checkpoint.pt`` when present.
        seed: seed of the augmentation stream.
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed_model: the ``DistributedDataParallel`` wrapper of ``network``.
        log: progress output.

    Returns:
        the history: one dictionary per epoch (mean loss and its parts, validation Dice, seconds).
    """
    check_option(optimizer, "optimizer", UNIREG_OPTIMIZERS)
    missing = sorted(set(sampler.domains) - set(dataset_conditions))
    if missing:
        raise ValueError(
            f"datasets {missing} of the sampler have no (task, reg_type) in dataset_conditions "
            f"{sorted(dataset_conditions)}."
        )
    if optimizer == "sgd":
        optimizer_factory = functools.partial(torch.optim.SGD, momentum=float(check_positive(momentum, "momentum")))
    else:
        optimizer_factory = torch.optim.Adam
    loader = UniRegPairLoader(network, dataset_conditions, ct_window)
    objective = UniRegObjective(network.tasks, lambdas, supervised_tasks, dice_weight, similarity)
    for task, _ in (dataset_conditions[name] for name in sampler.domains):
        objective.task_lambda(network.tasks[network.resolve_task(task)])
    return train_registration(
        network,
        objective,
        sampler,
        loader,
        output_dir,
        epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer_factory=optimizer_factory,
        parameter_groups=functools.partial(
            network.parameter_groups,
            head_scale=float(check_positive(head_learning_rate_scale, "head_learning_rate_scale")),
        ),
        augmentation=augmentation,
        validation_pairs=validation_pairs,
        validation_labels=validation_labels,
        validation_conditions=("task", "reg_type"),
        device=device,
        amp=amp,
        resume=resume,
        seed=seed,
        max_iterations_per_epoch=max_iterations_per_epoch,
        distributed_model=distributed_model,
        log=log,
    )
