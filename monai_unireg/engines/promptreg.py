"""PromptReg's defaults and training pieces: the paper's objective (Eq. 6) over several datasets, each a domain of
the knowledge base.

Xie et al., "PromptReg", MICCAI 2025 (``shared/papers/promptreg.txt``, Sec. 2.4 and 3.1):
``L = L_sim + 0.1 L_smooth + 0.001 L_ort + 0.001 L_ts`` with MIND-SSC similarity (radius 2, dilation 2), the
VoxelMorph smoothness (mean squared forward differences), the knowledge base's orthogonality (Eq. 1) and the task
similarity between the weighted prompt and the prompt of the pair's own dataset (Eq. 5); Adam (with AMSGrad, as the
authors' code; the paper says only "Adam"), learning rate 1e-4 with polynomial decay (power 0.9) per iteration,
batch 1, 100 random pairs per dataset per epoch, 300 epochs, images in [0, 1] (CT: HU [-1000, 1000]; MRI: [min, 99th
percentile]) resized to 160^3. Leaving one dataset out of training (and validating on it) gives the paper's
zero-shot setting (Table 1, :func:`split_held_out`). The bundle's ``train.yaml`` trains with MONAI's
``SupervisedTrainer``, :func:`prepare_domain_batch` and :class:`~monai_unireg.engines.bundle.RegistrationStep` on
:class:`PromptRegObjective`; the bundle's ``evaluate.yaml`` registers the pairs of several datasets
(:func:`dataset_pair_items`) and :class:`DatasetDiceTable` writes Table 1's row, one Dice column per dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.data import load_learn2reg, pair_name, read_learn2reg
from monai_unireg.engines.bundle import gather_rows, prepare_pair_batch
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.pair_registration import write_table
from monai_unireg.engines.training import Batch, LossTerms
from monai_unireg.engines.workflows import check_datasets, mean_spread_cell, spread_summary, write_result_table
from monai_unireg.losses import MINDSSCLoss, PromptOrthogonalityLoss, TaskSimilarityLoss, diffusion_regularisation
from monai_unireg.networks.nets.promptreg import load_promptreg
from monai_unireg.validation import check_bool, check_option, check_positive

__all__ = [
    "PROMPTREG_DEFAULTS",
    "PromptRegObjective",
    "split_held_out",
    "run_name",
    "prepare_domain_batch",
    "dataset_pair_items",
    "DatasetDiceTable",
]

#: PromptReg's defaults (one home for the command line, the bundle and the trainer).
PROMPTREG_DEFAULTS = MethodDefaults(
    name="promptreg",
    working_size=(160, 160, 160),
    size_multiple=8,
    ct_window=(-1000.0, 1000.0),
    intensity_range=(0.0, 1.0),
    load_weights=load_promptreg,
    sources={"working_size": "paper Sec. 3.1", "ct_window": "paper Sec. 3.1"},
)


def _prompt_network(model: Any) -> nn.Module:
    """The network inside ``DistributedDataParallel`` (``.module``) and ``PairInput`` (``.network``) wrappers: the
    :class:`PromptReg` itself.

    Raises:
        ValueError: ``model`` is not a network (e.g. a plain function, whose prompt the objective cannot read).
    """
    while not hasattr(model, "use_prompt"):
        inner = getattr(model, "module", None) or getattr(model, "network", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(
                f"PromptRegObjective reads the prompt of a PromptReg network, got {type(model).__name__}; pass the "
                "network as PromptRegObjective(network=...) (train.yaml: network: '@network_def')."
            )
        model = inner
    return model


class PromptRegObjective(nn.Module):
    r"""PromptReg's training loss (paper Eq. 6).

    .. math::

        L = \mathrm{MIND}(I_m \circ \phi, I_f) + \lambda_1 L_{smooth}(u) + \lambda_2 L_{ort}(B)
            + \lambda_3 L_{ts}(p_w, b_{domain})

    with ``u = network(moving, fixed)`` in voxels, :class:`~monai_unireg.losses.MINDSSCLoss` (radius 2, dilation 2),
    :func:`~monai_unireg.losses.diffusion_regularisation`, :class:`~monai_unireg.losses.PromptOrthogonalityLoss`
    on the knowledge base ``B`` (Eq. 1 as written; ``normalize_orthogonality`` gives the authors' code's version on
    unit prompts) and :class:`~monai_unireg.losses.TaskSimilarityLoss` between the weighted prompt and the prompt of
    each pair's domain (the batch's ``"domain"``). Without the prompt generator (the "w/o RPG" ablation) the last
    two terms are absent.

    Args:
        smoothness: ``lambda_1`` (paper: 0.1).
        orthogonality: ``lambda_2`` (paper: 0.001).
        task_similarity: ``lambda_3`` (paper: 0.001).
        normalize_orthogonality: L2-normalise the prompts in ``L_ort``.
        network: the network whose last forward pass's prompt the prompt terms read: the :class:`PromptReg`, or a
            wrapper of it (``PairInput``, ``DistributedDataParallel``); needed when ``forward`` is given a plain
            ``model(moving, fixed)`` function (the bundle's :class:`~monai_unireg.engines.bundle.RegistrationStep`);
            ``None``: the ``model`` of ``forward`` itself (a PromptReg or its DDP wrapper).
    """

    def __init__(
        self,
        smoothness: float = 0.1,
        orthogonality: float = 1e-3,
        task_similarity: float = 1e-3,
        normalize_orthogonality: bool = False,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # a reference, not a submodule: the network's parameters and train/eval mode are not the objective's
        object.__setattr__(self, "network", None if network is None else _prompt_network(network))
        self.smoothness = float(check_positive(smoothness, "smoothness", allow_zero=True))
        self.orthogonality = float(check_positive(orthogonality, "orthogonality", allow_zero=True))
        self.task_similarity = float(check_positive(task_similarity, "task_similarity", allow_zero=True))
        self.mind = MINDSSCLoss(radius=2, dilation=2)
        self.orthogonality_loss = PromptOrthogonalityLoss(
            check_bool(normalize_orthogonality, "normalize_orthogonality")
        )
        self.task_similarity_loss = TaskSimilarityLoss()

    def forward(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: Batch) -> LossTerms:
        """Loss of ``model(moving, fixed) -> ddf`` on ``batch`` (``moving``, ``fixed`` ``[B, 1, *S]``, ``domain``
        ``[B]`` int64 with the prompt generator)."""
        network = self.network if self.network is not None else _prompt_network(model)
        moving, fixed = batch["moving"], batch["fixed"]
        ddf = model(moving, fixed)
        similarity = self.mind(spatial.warp(moving, ddf), fixed)
        diffusion = diffusion_regularisation(ddf)
        total = similarity + self.smoothness * diffusion
        parts = {"similarity": similarity, "diffusion": diffusion}
        if getattr(network, "use_prompt", False):
            if "domain" not in batch:
                raise ValueError("the batch has no 'domain': the task-similarity loss needs each pair's dataset index.")
            prompt = network.pop_prompt()
            domains = batch["domain"].long().view(-1)
            if int(domains.max()) >= prompt.knowledge_base.shape[0] or int(domains.min()) < 0:
                raise ValueError(
                    f"domain ids {domains.tolist()} outside the knowledge base's {prompt.knowledge_base.shape[0]} "
                    "prompts: num_domains must equal the number of training datasets."
                )
            parts["orthogonality"] = self.orthogonality_loss(prompt.knowledge_base)
            parts["task_similarity"] = self.task_similarity_loss(prompt.weighted_prompt, prompt.knowledge_base[domains])
            total = (
                total + self.orthogonality * parts["orthogonality"] + self.task_similarity * parts["task_similarity"]
            )
        return LossTerms(total, **parts)


def split_held_out(
    datasets: Sequence[str | os.PathLike], held_out: str | os.PathLike | None = None
) -> tuple[list[str | os.PathLike], str | os.PathLike | None]:
    """Split ``datasets`` into the training datasets and the one held out of training (leave-one-dataset-out).

    Args:
        datasets: Learn2Reg ``*_dataset.json`` paths.
        held_out: ``None`` (train on all), or one of ``datasets``, given by its path or by its dataset name (the
            json's ``"name"``, e.g. ``"BrainSynth"``).

    Returns:
        the training datasets (in the given order) and the held-out path (``None`` without one).

    Raises:
        ValueError: ``datasets`` is empty or a single path, ``held_out`` names none (or several) of them, or it
            leaves no dataset to train on.
    """
    datasets = check_datasets(datasets)
    if held_out is None:
        return datasets, None
    if not isinstance(held_out, (str, os.PathLike)):
        raise ValueError(f"held_out must be a dataset json path or a dataset name, got {held_out!r}.")
    target = Path(held_out).expanduser().resolve()
    matches = [i for i, path in enumerate(datasets) if Path(path).expanduser().resolve() == target]
    names = [read_learn2reg(path).name for path in datasets]
    if not matches:
        matches = [i for i, name in enumerate(names) if name == os.fspath(held_out)]
    if len(matches) != 1:
        raise ValueError(
            f"held_out {os.fspath(held_out)!r} must name exactly one of datasets, by its path or its dataset name "
            f"({', '.join(names)}); it names {'none' if not matches else len(matches)}."
        )
    training = [path for i, path in enumerate(datasets) if i != matches[0]]
    if not training:
        raise ValueError(
            f"held_out {os.fspath(held_out)!r} is the only dataset of datasets, which leaves no training dataset; "
            "list at least one more dataset (the held-out one is used for zero-shot validation only)."
        )
    return training, datasets[matches[0]]


def run_name(
    datasets: Sequence[str | os.PathLike], held_out: str | os.PathLike | None = None, use_prompt: bool = True
) -> str:
    """Name of a training run (``train.yaml``'s ``output_dir``): ``promptreg``, ``_no_rpg`` for the "w/o RPG"
    ablation, ``_without_<dataset name>`` with a held-out dataset (the paper's "w/o X" rows of Table 1)."""
    _, held = split_held_out(datasets, held_out)
    name = "promptreg" if check_bool(use_prompt, "use_prompt") else "promptreg_no_rpg"
    return name if held is None else f"{name}_without_{read_learn2reg(held).name}"


def prepare_domain_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``prepare_batch`` of PromptReg's ``SupervisedTrainer``: :func:`~monai_unireg.engines.bundle.prepare_pair_batch`
    (the stacked ``[moving, fixed]`` ``image`` ``[B, 2, *S]`` and the pair) plus the pair's ``domain`` ``[B]``
    (int64: the index of its dataset in the :class:`~monai_unireg.data.PairSampler`, i.e. of its prompt in the
    knowledge base, which the task-similarity loss of :class:`PromptRegObjective` pulls towards) when the batch
    has one."""
    image, pair = prepare_pair_batch(batchdata, device, non_blocking)
    if "domain" in batchdata:
        domain = torch.as_tensor(batchdata["domain"]).view(-1)
        pair["domain"] = domain.to(device=device, dtype=torch.int64, non_blocking=non_blocking)
    return image, pair


def dataset_pair_items(
    dataset_jsons: Sequence[str | os.PathLike], section: str = "registration_val", max_pairs: int | None = None
) -> list[dict[str, Any]]:
    """The data list of an evaluation over several datasets (``evaluate.yaml``, paper Table 1): the pairs of each
    json's ``section`` (the first ``max_pairs``), each item's ``"dataset"`` its json's name and its ``"pair"``
    ``<dataset>/<pair name>`` (its output folder under ``output_dir``).

    Raises:
        ValueError: no datasets, two datasets with the same name, or a dataset without pairs in ``section``.
    """
    dataset_jsons = check_datasets(dataset_jsons)
    names = [read_learn2reg(path).name for path in dataset_jsons]
    if len(set(names)) != len(names):
        raise ValueError(f"datasets: two datasets have the same name ({names}); each needs its own folder.")
    items = []
    for path, name in zip(dataset_jsons, names):
        pairs = load_learn2reg(path, section)[:max_pairs]
        if not pairs:
            raise ValueError(f"datasets: {os.fspath(path)} has no {section} pairs to evaluate.")
        items += [{**pair, "dataset": name, "pair": f"{name}/{pair_name(pair)}"} for pair in pairs]
    return items


#: The spreads :class:`DatasetDiceTable` can put after the mean Dice.
SPREADS = ("std", "sem")


class DatasetDiceTable:
    """Evaluator handler: when the run completes, Table 1's row of the pairs the
    :class:`~monai_unireg.engines.bundle.RegistrationWriter` registered (its rows, each with its ``"dataset"``).

    Writes, per dataset, ``<output_dir>/<dataset>/metrics.csv`` and ``summary.json``
    (:func:`~monai_unireg.engines.write_table`), then ``<output_dir>/dice_table.csv`` and ``dice_table.md``: one row
    (``row_name``, e.g. the training set "w/o Abdominal") with one column per dataset, the mean Dice over its pairs
    in % ± ``spread`` (``"n/a"`` for a dataset without labelled pairs). In a ``torch.distributed`` run the rows of
    all ranks are gathered and rank 0 writes (:func:`~monai_unireg.engines.bundle.gather_rows`).
    ``engine.state.dice_table`` (rank 0) is the result: per dataset ``mean``, ``std`` / ``sem`` (in %) and ``n``.

    Args:
        output_dir: the evaluation's folder.
        datasets: the dataset names, in the table's column order.
        row_name: the row's name.
        spread: ``"std"`` (standard deviation over the pairs) or ``"sem"`` (standard error of the mean).
        section: the section the pairs come from (named in the table's footnote).
        log: progress output (the row), e.g. ``logger.info``; ``None``: quiet.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        datasets: Sequence[str],
        row_name: str = "PromptReg",
        spread: str = "std",
        section: str = "registration_val",
        log: Callable[[str], Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.datasets = list(datasets)
        self.row_name = str(row_name)
        self.spread = check_option(spread, "dice_spread", SPREADS)
        self.section = section
        self.log = log

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        rows = getattr(engine.state, "registration_rows", None)
        if rows is None:
            raise ValueError("DatasetDiceTable needs a RegistrationWriter among the evaluator's handlers, before it.")
        rows = gather_rows(rows)
        if rows is None:  # not rank 0
            return
        results, cells = {}, []
        for name in self.datasets:
            own = [row for row in rows if row.get("dataset") == name]
            write_table(own, self.output_dir / name / "metrics.csv", self.output_dir / name / "summary.json")
            scores = 100 * np.asarray([r["dice_mean"] for r in own if r.get("dice_mean") is not None], dtype=float)
            results[name] = spread_summary(scores, self.spread)  # Dice in %
            cells.append(mean_spread_cell(results[name], self.spread, digits=1))  # as the paper's Table 1
        counts = ", ".join(f"{name} {results[name]['n']}" for name in self.datasets)
        deviation = "standard deviation" if self.spread == "std" else "standard error"
        write_result_table(
            self.output_dir / "dice_table",
            ["training set", *self.datasets],
            [[self.row_name, *cells]],
            f"Dice (%), mean ± {deviation} over the {self.section} pairs with labels ({counts}).",
        )
        engine.state.dice_table = results
        if self.log is not None:
            cells_text = ", ".join(f"{name} {cell}" for name, cell in zip(self.datasets, cells))
            self.log(f"Dice (%) per dataset, {self.row_name}: {cells_text}")
