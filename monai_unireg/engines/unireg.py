"""UniReg's defaults and training pieces: one network over several tasks, each with its own regularisation
prior and optional labels.

Li et al., "UniReg" (``shared/papers/unireg.txt``, Sec. 3.2, 4.3, Table 8): ``L = L_sim(F, M o phi) + lambda_task
L_reg(phi)`` (Eq. 6) with the regularisation prior ``lambda_task`` of the pair's task (HeadNeck 0.05, Chest 1,
Abdomen 0.1, Liver 10), plus a Dice loss on the segmentation masks of the tasks that provide them ("optional
anatomical knowledge"); NCC similarity and diffusion regulariser (the losses the paper gives SAME "as in UniReg");
tasks sampled uniformly (one dataset per task, the same number of pairs from each per epoch); SGD with momentum
0.99 at a learning rate of 5e-5 (Adam as an option); batch 1; CT clipped to HU [-800, 400] and mapped to [-1, 1].
The training is ``bundles/unireg/configs/train.yaml`` (MONAI's ``SupervisedTrainer`` with :func:`unireg_objective`).

The pieces of the bundle's MONAI configs (``bundles/unireg``) are here too: each pair's condition
(:class:`UniRegConditiond`, :func:`prepare_unireg_batch`, :func:`prepare_conditioned_batch`), the objective of the
datasets (:func:`unireg_objective`), their validation and evaluation pairs (:func:`unireg_pairs`,
:class:`EvaluationLabelsd`), the network with one condition (:func:`unireg_registration`, for ``inference.yaml`` and
``monai-unireg register``) or each pair's (:class:`UniRegRegistration`), and the paper's Table 2 (:class:`UniRegTable`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.transforms import Transform

from monai_unireg import io, spatial
from monai_unireg.data import load_learn2reg, pair_name, read_learn2reg
from monai_unireg.engines.bundle import batch_tensor, gather_rows, prepare_pair_batch
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.instance_optimisation import FieldOptimised
from monai_unireg.engines.pair_registration import write_table
from monai_unireg.engines.training import Batch, Log, LossTerms
from monai_unireg.engines.workflows import mean_spread_cell, spread_summary, write_result_table
from monai_unireg.losses import LNCCLoss, MINDSSCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets import ResizedRegistration
from monai_unireg.networks.nets.unireg import REGISTRATION_TYPES, UniReg, load_unireg
from monai_unireg.validation import check_integer, check_option, check_positive

__all__ = [
    "DEFAULT_LAMBDAS",
    "DEFAULT_REG_TYPE",
    "DEFAULT_TASK",
    "DatasetEntry",
    "EvaluationLabelsd",
    "UniRegConditiond",
    "UniRegRegistration",
    "UniRegTable",
    "dataset_entries",
    "prepare_conditioned_batch",
    "prepare_unireg_batch",
    "supervised_regions",
    "unireg_objective",
    "unireg_pairs",
    "unireg_registration",
    "validation_label_values",
    "UNIREG_DEFAULTS",
    "UNIREG_CT_WINDOW",
    "UNIREG_INTENSITY_RANGE",
    "UNIREG_LAMBDAS",
    "UNIREG_SIMILARITIES",
    "UniRegObjective",
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


def unireg_similarity(name: str, reduction: str = "mean") -> nn.Module:
    """UniReg's similarity loss ``(warped, fixed)``: ``"lncc"``, :class:`~monai_unireg.losses.LNCCLoss` on a 9^3 box
    window (NCC, the paper's); ``"mind"``, :class:`~monai_unireg.losses.MINDSSCLoss` (radius 2, dilation 2; the
    paper's suggestion for MR and multimodal pairs). ``reduction`` as those losses' (``"none"``: per voxel)."""
    check_option(name, "similarity", UNIREG_SIMILARITIES)
    if name == "lncc":
        return LNCCLoss(spatial_dims=3, kernel_type="box", kernel_size=9, reduction=reduction)
    return MINDSSCLoss(radius=2, dilation=2, reduction=reduction)


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
        """Loss of ``model(moving, fixed, task=..., reg_type=...) -> ddf`` (a :class:`UniReg`, its
        ``DistributedDataParallel`` wrapper, or the bundle trainer's network call) on ``batch`` (with ``"task"`` and
        ``"reg_type"`` indices, as :class:`UniRegConditiond` gives)."""
        if "task" not in batch or "reg_type" not in batch:
            raise ValueError("the batch has no 'task' / 'reg_type': add them with UniRegConditiond.")
        moving, fixed = batch["moving"], batch["fixed"]
        tasks = batch["task"].long().view(-1)
        ddf = model(moving, fixed, task=tasks, reg_type=batch["reg_type"].long().view(-1))
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


# ---- the bundle (bundles/unireg): conditions, objective, pairs, evaluation --------------------------------------

#: Regularisation priors of the bundle: the paper's Table 8 and 1.0 for the shared data's brain and pelvis (ours).
DEFAULT_LAMBDAS = {**UNIREG_LAMBDAS, "brain": 1.0, "pelvis": 1.0}
#: The condition of ``inference.yaml`` and ``monai-unireg register --method unireg`` when none is given: the task of
#: the bundle's first default training dataset (BrainSynth), between two subjects.
DEFAULT_TASK = "brain"
DEFAULT_REG_TYPE = "inter"
#: The keys of a dataset entry of ``train.yaml`` / ``evaluate.yaml``.
DATASET_KEYS = ("json", "task", "reg_type")
#: The batch keys of a pair's condition (int64 indices, :class:`UniRegConditiond`).
CONDITION_KEYS = ("task", "reg_type")
#: The columns of :class:`UniRegTable`'s table (the paper's Table 2 and HD95).
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

    @property
    def condition(self) -> str:
        """The condition in words, e.g. ``task prostate (nearest region pelvis), intra-subject``."""
        subject = "inter-subject" if self.reg_type == "inter" else "intra-subject"
        return f"task {self.task}{f' (nearest region {self.region})' if self.task != self.region else ''}, {subject}"


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
        reg_type: ``"inter"`` (two subjects) or ``"intra"`` (one subject, e.g. breathing or contrast phases).
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
    text = f"UniReg condition: {DatasetEntry('', '', task, region, reg_type).condition}"
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


def supervised_regions(
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


def unireg_objective(
    network: UniReg,
    datasets: Sequence[Mapping[str, Any]],
    lambdas: Mapping[str, float] = DEFAULT_LAMBDAS,
    supervised_tasks: Collection[str] | None = None,
    dice_weight: float = 1.0,
    similarity: str = "lncc",
) -> UniRegObjective:
    """The :class:`UniRegObjective` of ``train.yaml``: the priors of the datasets' regions (each must have one in
    ``lambdas``), the Dice term on the ``supervised_tasks`` (``None``: every dataset's region; ``[]``: none).

    Raises:
        ValueError: a bad dataset entry, a region without a prior, an unknown supervised task or similarity.
    """
    entries = dataset_entries(datasets, network)
    priors = {entry.region: _task_lambda(entry.region, lambdas) for entry in entries}
    supervised = supervised_regions(network, supervised_tasks, entries)
    return UniRegObjective(network.tasks, priors, supervised, dice_weight, similarity)


class UniRegConditiond(Transform):
    """Add a pair's condition: int64 scalars ``"task"`` (index in ``network.tasks``, aliases resolved) and
    ``"reg_type"`` (index in :data:`~monai_unireg.networks.nets.unireg.REGISTRATION_TYPES`), those of the entry of
    its ``"dataset"`` (every pair of :class:`~monai_unireg.data.PairSampler` and :func:`unireg_pairs` names it).

    Args:
        network: the UniReg (its regions and aliases).
        datasets: the ``{"json", "task", "reg_type"}`` entries (:func:`dataset_entries`).
    """

    def __init__(self, network: UniReg, datasets: Sequence[Mapping[str, Any]]) -> None:
        self.conditions = {
            entry.name: (network.tasks.index(entry.region), REGISTRATION_TYPES.index(entry.reg_type))
            for entry in dataset_entries(datasets, network)
        }

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        name = data.get("dataset")
        if name not in self.conditions:
            raise ValueError(
                f"pair {data.get('fixed_image')} is of the dataset {name!r}, which has no condition among the "
                f"datasets {sorted(self.conditions)}."
            )
        task, kind = self.conditions[name]
        return {**data, "task": torch.tensor(task), "reg_type": torch.tensor(kind)}


class EvaluationLabelsd(Transform):
    """Keep only a pair's ``"evaluation_labels"`` (set by :func:`unireg_pairs`) in its label maps (the other values
    become background), so each dataset is scored over its own labels; the key is removed. ``None``: all kept.

    Args:
        keys: the label-map keys.
    """

    def __init__(self, keys: Sequence[str] = ("fixed_label", "moving_label")) -> None:
        self.keys = tuple(keys)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        labels = d.pop("evaluation_labels", None)
        if labels is None:
            return d
        for key in self.keys:
            if key in d:
                keep = torch.isin(torch.as_tensor(d[key]), torch.tensor(list(labels)))
                d[key] = d[key] * keep.to(d[key].dtype)
        return d


def _label_values(path: str) -> list[int]:
    """The non-zero values of a label-map file."""
    values = np.unique(np.asarray(nib.load(path).dataobj))
    return [int(v) for v in values if v != 0]


def unireg_pairs(
    network: UniReg,
    datasets: Sequence[Mapping[str, Any]],
    section: str = "registration_val",
    max_pairs: int | None = None,
    labelled: bool = False,
    labels: Sequence[int] | None = None,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """The pairs of ``section`` of every dataset: validation's (``labelled``: only pairs with both label maps, none
    with ``max_pairs`` 0) or evaluation's (every pair; a dataset without any is refused).

    Each pair is tagged with its ``"dataset"`` (its condition, :class:`UniRegConditiond`), its
    ``"evaluation_labels"`` (``labels`` when given, else the json's, else the fixed map's non-zero values;
    :class:`EvaluationLabelsd`) and
    ``"pair"`` = ``<dataset>/<pair name>`` (its folder under the writer's ``output_dir``).

    Raises:
        ValueError: a bad dataset entry, a bad ``max_pairs``, or (evaluation) a dataset without pairs.
    """
    if max_pairs is not None:
        check_integer(max_pairs, "max_validation_pairs" if labelled else "max_pairs", 0 if labelled else 1)
    items: list[dict[str, Any]] = []
    for index, entry in enumerate(dataset_entries(datasets, network)):
        pairs = load_learn2reg(entry.json, section)
        if labelled:
            pairs = [pair for pair in pairs if "fixed_label" in pair and "moving_label" in pair]
        pairs = pairs[:max_pairs]
        if not pairs and not labelled:
            raise ValueError(f"datasets[{index}]: {os.fspath(entry.json)} has no {section} pairs to evaluate.")
        if log is not None:
            log(f"{entry.name}: {len(pairs)} {'labelled ' if labelled else ''}{section} pairs, {entry.condition}")
        listed = read_learn2reg(entry.json).evaluation_labels or None
        for pair in pairs:
            values = labels or listed or (_label_values(pair["fixed_label"]) if "fixed_label" in pair else None)
            items.append(
                {**pair, "dataset": entry.name, "evaluation_labels": values, "pair": f"{entry.name}/{pair_name(pair)}"}
            )
    return items


def validation_label_values(pairs: Sequence[Mapping[str, Any]]) -> list[int] | None:
    """The label values of the validation Dice: the union of the pairs' ``evaluation_labels`` (a label absent from
    both maps of a pair is skipped, so each pair counts its dataset's labels); ``None`` without pairs."""
    values = sorted({int(v) for pair in pairs for v in (pair.get("evaluation_labels") or ())})
    return values or None


def _conditions(batchdata: Mapping[str, Any], device: torch.device | str | None, non_blocking: bool) -> dict:
    missing = [key for key in CONDITION_KEYS if key not in batchdata]
    if missing:
        raise ValueError(
            f"a UniReg batch needs its condition {missing} (add monai_unireg.engines.UniRegConditiond to the "
            f"preprocessing), got the keys {sorted(batchdata)}."
        )
    return {key: batch_tensor(batchdata[key], device, non_blocking).long().view(-1) for key in CONDITION_KEYS}


def prepare_unireg_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``prepare_batch`` of UniReg's ``SupervisedTrainer``: :func:`~monai_unireg.engines.bundle.prepare_pair_batch`
    with the pair's ``"task"`` and ``"reg_type"`` indices ``[B]`` (what :class:`UniRegObjective` reads)."""
    image, pair = prepare_pair_batch(batchdata, device, non_blocking)
    return image, {**pair, **_conditions(batchdata, device, non_blocking)}


def prepare_conditioned_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
    """``prepare_batch`` of UniReg's ``SupervisedEvaluator``: ``(image, label, (), {"task", "reg_type"})``, so the
    inferer calls ``network(image, task=..., reg_type=...)`` with each pair's condition."""
    image = batch_tensor(batchdata["image"], device, non_blocking)
    label = batch_tensor(batchdata["label"], device, non_blocking) if "label" in batchdata else None
    return image, label, (), _conditions(batchdata, device, non_blocking)


class UniRegRegistration(nn.Module):
    """``forward(moving, fixed, task, reg_type) -> ddf`` for pairs of any size, each batch with its condition (task
    and registration type indices ``[B]``, one condition per batch): :func:`unireg_registration` of that condition
    (working size, optional instance optimisation with the region's prior), one per dataset entry, built (and so
    checked) at construction.

    Args:
        network: the UniReg.
        datasets: the ``{"json", "task", "reg_type"}`` entries whose conditions it registers.
        io_iterations, similarity, lambdas, io_learning_rate: as :func:`unireg_registration`.
    """

    def __init__(
        self,
        network: UniReg,
        datasets: Sequence[Mapping[str, Any]],
        io_iterations: int = 0,
        similarity: str = "lncc",
        lambdas: Mapping[str, float] = DEFAULT_LAMBDAS,
        io_learning_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.network = network
        self.registrations = {
            (network.tasks.index(entry.region), REGISTRATION_TYPES.index(entry.reg_type)): unireg_registration(
                network, entry.task, entry.reg_type, io_iterations, similarity, lambdas, io_learning_rate, None
            )
            for entry in dataset_entries(datasets, network)
        }

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, task: torch.Tensor, reg_type: torch.Tensor
    ) -> torch.Tensor:
        conditions = {(int(t), int(r)) for t, r in zip(task.view(-1), reg_type.view(-1))}
        if len(conditions) != 1 or next(iter(conditions)) not in self.registrations:
            raise ValueError(
                f"a batch must hold one condition of the datasets' {sorted(self.registrations)} (task, reg_type "
                f"indices), got {sorted(conditions)}."
            )
        return self.registrations[next(iter(conditions))](moving, fixed)


def _statistics(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> dict[str, float]:
    """:func:`~monai_unireg.engines.workflows.spread_summary` (mean, std over the pairs, n) of ``key`` in ``rows``,
    times ``scale``."""
    return spread_summary(scale * np.asarray([row[key] for row in rows if row.get(key) is not None], dtype=float))


class UniRegTable:
    """Evaluator handler of ``evaluate.yaml`` (attach it after the ``RegistrationWriter``): when the run completes,
    the rows of the pairs (named ``<dataset>/<pair>`` by :func:`unireg_pairs`) as ``<output_dir>/<dataset>/
    metrics.csv`` and ``summary.json`` (:func:`~monai_unireg.engines.write_table`), then the paper's Table 2:
    ``<output_dir>/evaluation_table.csv`` and ``.md`` (one row per dataset: task, registration type, pairs, DSC in %
    and HD95 in mm as mean ± standard deviation, SDlogJ and % folding as means) and ``evaluation.json`` (every mean,
    standard deviation and count). The rows of all ranks of a ``torch.distributed`` run are gathered; rank 0 writes.

    Args:
        output_dir: the writer's folder.
        network: the UniReg (the datasets' regions).
        datasets: the ``{"json", "task", "reg_type"}`` entries, one row each, in this order.
        section: the section registered (for the table's note).
        io_iterations: the instance-optimisation steps (the method's name in the table).
        log: one line per dataset (``None``: quiet).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        network: UniReg,
        datasets: Sequence[Mapping[str, Any]],
        section: str = "registration_val",
        io_iterations: int = 0,
        log: Log | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.entries = dataset_entries(datasets, network)
        self.section, self.log = section, log
        self.method = f"UniReg + IO ({io_iterations} steps)" if io_iterations else "UniReg"

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        rows = gather_rows(getattr(engine.state, "registration_rows", None))
        if rows is None:
            return
        results: dict[str, dict[str, Any]] = {}
        table = []
        for entry in self.entries:
            prefix = f"{entry.name}/"
            mine = [{**row, "pair": row["pair"][len(prefix) :]} for row in rows if row["pair"].startswith(prefix)]
            write_table(
                mine, self.output_dir / entry.name / "metrics.csv", self.output_dir / entry.name / "summary.json"
            )
            result = {
                "task": entry.task,
                "region": entry.region,
                "reg_type": entry.reg_type,
                "pairs": len(mine),
                "dice_percent": _statistics(mine, "dice_mean", 100.0),
                "hd95_mm": _statistics(mine, "hd95_mm_mean"),
                "sdlogj": _statistics(mine, "sdlogj"),
                "folding_percent": _statistics(mine, "folding_percent"),
            }
            results[entry.name] = result
            task = entry.task if entry.task == entry.region else f"{entry.task} ({entry.region})"
            table.append(
                [
                    entry.name,
                    task,
                    entry.reg_type,
                    str(len(mine)),
                    mean_spread_cell(result["dice_percent"], digits=2),  # two decimals: the paper's Table 2
                    mean_spread_cell(result["hd95_mm"], digits=2),
                    mean_spread_cell(result["sdlogj"], None, digits=3),
                    mean_spread_cell(result["folding_percent"], None, digits=2),
                ]
            )
            if self.log is not None:
                self.log(f"{entry.name}: " + ", ".join(f"{h} {c}" for h, c in zip(TABLE_HEADER[4:], table[-1][4:])))
        write_result_table(
            self.output_dir / "evaluation_table",
            TABLE_HEADER,
            table,
            f"{self.method} on the {self.section} pairs: DSC (%) and HD95 (mm), mean ± standard deviation over the "
            "pairs with labels; SDlogJ and folding (% of voxels with a non-positive Jacobian determinant), means over "
            "the pairs.",
        )
        summary = {"method": self.method, "section": self.section, "datasets": results}
        with io.atomic_path(self.output_dir / "evaluation.json") as temporary:
            temporary.write_text(json.dumps(summary, indent=2))
        engine.state.registration_summary = summary
