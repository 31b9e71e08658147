"""PromptReg workflows for the MONAI bundle (``bundles/promptreg``): train the network, tabulate Dice.

``inference.yaml`` builds its network from MONAI parts (a ``PairInput`` network_def, ``SupervisedEvaluator``);
:func:`train_workflow` is everything ``train.yaml`` and
``multi_gpu_train.yaml`` do: training on several datasets (one knowledge-base prompt each) from scratch or from a
weights file, with one dataset held out for the zero-shot setting of the paper's Table 1, on one process or several
(``torchrun``, ``torch.distributed`` with NCCL on CUDA and Gloo on the CPU); :func:`evaluate_datasets` is what
``evaluate.yaml`` does: register the pairs of several datasets and write one Dice row with a column per dataset,
as Table 1.

Xie et al., "PromptReg: Universal Medical Image Registration via Task Prompt Learning and Domain Knowledge
Transfer", MICCAI 2025 (``shared/papers/promptreg.txt``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from monai_unireg.data import PairSampler, load_learn2reg, read_learn2reg
from monai_unireg.engines.pair_registration import register_pairs, resolve_device, write_table
from monai_unireg.engines.promptreg import train_promptreg
from monai_unireg.engines.training import CT_WINDOW
from monai_unireg.engines.workflows import (
    check_datasets,
    check_resumable,
    distributed_training,
    size_text,
    validation_set,
    working_size,
    wrap_distributed,
    write_result_table,
)
from monai_unireg.networks.nets.promptreg import PromptReg, load_promptreg
from monai_unireg.validation import check_bool, check_integer, check_option

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "evaluate_datasets",
    "run_name",
    "split_held_out",
    "train_workflow",
]

LOGGER = logging.getLogger("promptreg")

#: Working size of a new network: every volume is resized to 160^3 (paper Sec. 3.1).
DEFAULT_INPUT_SIZE = (160, 160, 160)

#: The spreads :func:`evaluate_datasets` can put after the mean Dice.
SPREADS = ("std", "sem")


def _new_network(
    input_size: int | Sequence[int],
    num_domains: int,
    channels: int,
    temperature: float,
    use_prompt: bool,
    seed: int,
) -> PromptReg:
    """A new :class:`PromptReg` whose initial weights are drawn from ``seed`` (the global random state is kept)."""
    check_integer(seed, "seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PromptReg(
            working_size(input_size, 8),
            num_domains=check_integer(num_domains, "num_domains", 1),
            channels=channels,
            temperature=temperature,
            use_prompt=check_bool(use_prompt, "use_prompt"),
        )


def _describe_network(network: PromptReg) -> str:
    config = network.config
    prompt = f"{config['num_domains']} prompts, tau {config['temperature']:g}" if network.use_prompt else "no RPG"
    return f"working size {size_text(network.input_size)}, channels {config['channels']}, {prompt}"


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


def _initial_network(
    input_size: int | Sequence[int],
    num_domains: int,
    channels: int,
    temperature: float,
    use_prompt: bool,
    seed: int,
    init_weights: str | os.PathLike | None,
) -> PromptReg:
    """The network training starts from (see :func:`train_workflow`)."""
    if init_weights is None:
        return _new_network(input_size, num_domains, channels, temperature, use_prompt, seed)
    network = load_promptreg(init_weights)
    if network.use_prompt and network.config["num_domains"] != num_domains:
        raise ValueError(
            f"init_weights {os.fspath(init_weights)!r} has a knowledge base of {network.config['num_domains']} "
            f"prompts, one per dataset it was trained on, but {num_domains} training dataset(s) are given; "
            "fine-tune on as many datasets, in the order the prompts were trained (each dataset keeps its prompt)."
        )
    return network


def train_workflow(
    datasets: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    held_out: str | os.PathLike | None = None,
    epochs: int = 300,
    pairs_per_dataset: int = 100,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    power: float = 0.9,
    smoothness: float = 0.1,
    orthogonality: float = 1e-3,
    task_similarity: float = 1e-3,
    normalize_orthogonality: bool = False,
    temperature: float = 0.1,
    use_prompt: bool = True,
    input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
    channels: int = 16,
    ct_window: Sequence[float] = CT_WINDOW,
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
    """Train PromptReg (or fine-tune it) over several datasets with the paper's objective (Eq. 6).

    Each training dataset is one domain with its own prompt in the knowledge base (``num_domains`` = the number
    of training datasets, in the order given). Every epoch draws ``pairs_per_dataset`` random pairs from each
    (:class:`~monai_unireg.data.PairSampler`, seeded by ``seed``), reads them as ``[1, *input_size]`` images in
    [0, 1] (CT: ``ct_window``; MRI: [min, 99th percentile]) and takes Adam steps on batches of ``batch_size``
    pairs with the polynomial decay stepped every iteration (:func:`~monai_unireg.engines.train_promptreg`: MIND
    + ``smoothness`` x diffusion + ``orthogonality`` x L_ort + ``task_similarity`` x L_ts). ``<output_dir>``
    gets ``checkpoint.pt`` and ``model.pt`` after every epoch; a run resumes from ``checkpoint.pt`` (refused when
    it holds another network's settings or other training datasets).

    Leave-one-dataset-out (paper Table 1, "w/o X"): ``held_out`` names one of ``datasets``; it is left out of
    training and, unless ``validation_json`` is given, the labelled pairs of its ``validation_section`` are the
    validation pairs, so the validation Dice after every epoch is a zero-shot score.

    The starting network: a new one (``input_size``, ``channels``, ``temperature``, ``use_prompt``; initial
    weights drawn from ``seed``), or with ``init_weights`` (fine-tuning) the network of that file with its whole
    configuration (working size included: the prompts have the size of its bottleneck), whose knowledge base must
    have one prompt per training dataset.

    Launched by ``torchrun`` with several processes (or any number and ``distributed=True``), every process joins
    ``torch.distributed`` (:func:`~monai_unireg.engines.workflows.distributed_training`: NCCL on CUDA, each
    process on ``cuda:LOCAL_RANK``; Gloo on the CPU) and trains a ``DistributedDataParallel`` copy on every
    ``WORLD_SIZE``-th pair of each epoch (PromptReg's forward runs once per step; the prompt losses read the
    prompt of that forward); rank 0 validates, logs and writes the checkpoints.

    Args:
        datasets: Learn2Reg ``*_dataset.json`` paths (paper: Brain, Abdominal, Hippocampus, Cardiac, Hip).
        output_dir: folder of ``checkpoint.pt`` and ``model.pt``.
        held_out: ``None``, or the path or dataset name of one of ``datasets``, left out of training.
        epochs: total epochs, resumed epochs included (paper: 300).
        pairs_per_dataset: random pairs per training dataset per epoch (paper: 100).
        batch_size: pairs per iteration and process (paper: 1).
        learning_rate: initial Adam learning rate (paper: 1e-4).
        power: exponent of the polynomial decay (paper: 0.9).
        smoothness: ``lambda_1``, weight of the diffusion term (paper: 0.1).
        orthogonality: ``lambda_2``, weight of L_ort (Eq. 1; paper: 0.001).
        task_similarity: ``lambda_3``, weight of L_ts (Eq. 5; paper: 0.001).
        normalize_orthogonality: L_ort on L2-normalised prompts (the authors' code) instead of the raw prompts
            (Eq. 1, the default).
        temperature: ``tau`` of the prompt weights (Eq. 3; paper: 0.1).
        use_prompt: ``False``: the backbone alone, without the prompt generator (the "w/o RPG" ablation).
        input_size: working size of a new network, one size or 3, each a multiple of 8 (paper: 160^3).
        channels: base channels of a new network's backbone (16).
        ct_window: HU window of CT images, mapped to [0, 1] (paper: [-1000, 1000]).
        init_weights: a ``model.pt`` to fine-tune.
        validation_json: a Learn2Reg json whose labelled pairs are scored (mean Dice) after every epoch; ``None``:
            the held-out dataset's (no validation without either).
        validation_section: the section scored.
        validation_labels: label values of that Dice; ``None``: the json's ``evaluation_labels`` (all non-zero
            labels of each fixed map when it names none).
        max_validation_pairs: score only the first pairs of the section (``None``: all).
        resume: continue from ``<output_dir>/checkpoint.pt`` when it exists.
        seed: seed of the pair sampler and of a new network's initial weights.
        amp: automatic mixed precision (CUDA only).
        device: training device; ``"auto"``: CUDA when available, else the CPU (under torchrun on CUDA:
            ``cuda:LOCAL_RANK``).
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed: ``None``: join ``torch.distributed`` when torchrun started several processes; ``True``: join
            it even with one process, and refuse to run without torchrun; ``False``: a single process (refused when
            torchrun started several).
        logger: progress output (rank 0).

    Returns:
        the history: one dictionary per epoch (mean ``loss``, ``similarity``, ``diffusion``, ``orthogonality`` and
        ``task_similarity`` with the prompt, ``learning_rate``, ``validation_dice`` with validation pairs,
        ``seconds``, ``epoch``).

    Raises:
        ValueError: no datasets, a ``held_out`` that names none of them or leaves none to train on, a negative
            weight, an invalid size, unlabelled validation pairs, an ``init_weights`` file with another number of
            prompts, a checkpoint of another run in ``output_dir``, or a distributed setting that does not match
            the launch.
    """
    check_bool(resume, "resume")
    check_bool(use_prompt, "use_prompt")
    training, held = split_held_out(datasets, held_out)
    sampler = PairSampler(training, pairs_per_dataset=pairs_per_dataset, seed=seed)
    domains = list(sampler.domains)
    held_name = read_learn2reg(held).name if held is not None else None
    validation_source = validation_json if validation_json is not None else held
    pairs, validation_labels = validation_set(
        validation_source, validation_section, max_validation_pairs, validation_labels
    )
    with distributed_training(distributed, resolve_device(device)) as run:
        if run.enabled:
            logger.info("process %d of %d (%s) on %s", run.rank, run.world_size, run.backend, run.device)
        network = _initial_network(input_size, len(domains), channels, temperature, use_prompt, seed, init_weights)
        if resume:
            check_resumable(output_dir, network.config, domains, " and held_out")
        network.to(run.device)
        if run.rank == 0:
            if held is not None:
                validation = (
                    f"validation on {len(pairs)} {validation_section} pairs of "
                    + (held_name if validation_json is None else os.fspath(validation_json))
                    if pairs
                    else f"no labelled {validation_section} pairs to validate on"
                )
                logger.info("held out of training: %s (zero-shot); %s", held_name, validation)
            logger.info(
                "PromptReg%s at %s, %d parameters; %d pairs per epoch from %s, %d epochs, batch %d%s, "
                "lambdas %g / %g / %g",
                f", fine-tuning {os.fspath(init_weights)}," if init_weights is not None else "",
                _describe_network(network),
                sum(p.numel() for p in network.parameters()),
                len(sampler),
                domains,
                epochs,
                batch_size,
                f" per process on {run.world_size} processes" if run.enabled else "",
                smoothness,
                orthogonality,
                task_similarity,
            )
        return train_promptreg(
            network,
            sampler,
            output_dir,
            epochs,
            smoothness=smoothness,
            orthogonality=orthogonality,
            task_similarity=task_similarity,
            learning_rate=learning_rate,
            power=power,
            batch_size=batch_size,
            normalize_orthogonality=normalize_orthogonality,
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


def _dice_summary(scores: Sequence[float], spread: str) -> dict[str, float]:
    """``n`` and, with scores, the ``mean`` and ``spread`` (``std`` or ``sem``) of Dice scores in %."""
    values = 100 * np.asarray(scores, dtype=float)
    if not values.size:
        return {"n": 0}
    if spread == "std":
        deviation = float(values.std())
    else:
        deviation = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), spread: deviation, "n": int(values.size)}


def _dice_cell(summary: dict[str, float], spread: str) -> str:
    """``"mean ± spread"`` with one decimal, as the paper's Table 1; ``"n/a"`` without scores."""
    return f"{summary['mean']:.1f} ± {summary[spread]:.1f}" if summary["n"] else "n/a"


def evaluate_datasets(
    network_def: nn.Module | Callable[[tuple[int, ...]], nn.Module],
    dataset_jsons: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    section: str = "registration_val",
    modality: str = "auto",
    device: str | torch.device | None = "auto",
    labels: Sequence[int] | None = None,
    ct_window: Sequence[float] = CT_WINDOW,
    row_name: str = "PromptReg",
    spread: str = "std",
    max_pairs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Register the pairs of several datasets and tabulate the Dice per dataset, as the paper's Table 1.

    For each dataset json (named by its ``"name"``): :func:`~monai_unireg.engines.register_pairs` writes the
    per-pair outputs to ``<output_dir>/<dataset>/<pair name>/`` and :func:`~monai_unireg.engines.write_table` its
    ``<output_dir>/<dataset>/metrics.csv`` and ``summary.json``. Then ``<output_dir>/dice_table.csv`` and
    ``dice_table.md`` get one row (``row_name``, e.g. the training set "w/o Abdominal") with one column per
    dataset: the mean Dice over the pairs in % ± ``spread`` (``"n/a"`` for a dataset without labelled pairs).

    Args:
        network_def: the network, or a function of the fixed grid's shape returning it (as ``register_pairs``).
        dataset_jsons: Learn2Reg ``*_dataset.json`` paths, one column each.
        output_dir: where everything goes.
        section: the pairs of each json (paper: the test sets, ``registration_test``).
        modality: ``"auto"``, ``"ct"`` or ``"mri"`` intensity normalisation.
        device: where the network runs.
        labels: label values averaged by each pair's Dice, the same for every dataset; ``None``: each json's
            ``evaluation_labels`` (its non-zero labels when it names none).
        ct_window: HU window of CT images (paper: [-1000, 1000]).
        row_name: the row's name.
        spread: ``"std"``: standard deviation over the pairs; ``"sem"``: standard error of the mean (the size of
            the paper's ± values suggests this one).
        max_pairs: only the first pairs of each section (``None``: all).
        log: progress output.

    Returns:
        per dataset name: ``mean`` and ``std`` / ``sem`` of the Dice in %, and ``n``, the pairs scored.

    Raises:
        ValueError: no datasets, two datasets with the same name, an empty section, or an unknown ``spread``.
    """
    check_option(spread, "spread", SPREADS)
    dataset_jsons = check_datasets(dataset_jsons)
    if max_pairs is not None:
        check_integer(max_pairs, "max_pairs", 1)
    descriptions = [read_learn2reg(path) for path in dataset_jsons]
    names = [description.name for description in descriptions]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset_jsons: two datasets have the same name ({names}); each needs its own folder.")
    output = Path(output_dir)
    results: dict[str, dict[str, float]] = {}
    cells = []
    for path, description in zip(dataset_jsons, descriptions):
        pairs = load_learn2reg(path, section)[:max_pairs]
        if not pairs:
            raise ValueError(f"dataset_jsons: {os.fspath(path)} has no {section} pairs to evaluate.")
        log(f"{description.name}: {len(pairs)} {section} pairs")
        rows = register_pairs(
            network_def,
            pairs,
            output / description.name,
            modality,
            device,
            labels if labels is not None else description.evaluation_labels or None,
            ct_window,
            log,
        )
        write_table(rows, output / description.name / "metrics.csv", output / description.name / "summary.json")
        scores = [row["dice_mean"] for row in rows if row.get("dice_mean") is not None]
        results[description.name] = _dice_summary(scores, spread)
        cells.append(_dice_cell(results[description.name], spread))
    counts = ", ".join(f"{name} {results[name]['n']}" for name in names)
    write_result_table(
        output / "dice_table",
        ["training set", *names],
        [[row_name, *cells]],
        f"Dice (%), mean ± {'standard deviation' if spread == 'std' else 'standard error'} over the {section} pairs "
        f"with labels ({counts}).",
    )
    log(f"Dice (%) per dataset, {row_name}: " + ", ".join(f"{n} {c}" for n, c in zip(names, cells)))
    return results
