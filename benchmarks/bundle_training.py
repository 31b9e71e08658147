"""Train a bundle's own ``configs/train.yaml`` in process, for the short-training benchmarks.

:func:`train_bundle` builds the bundle's MONAI train workflow (``monai.bundle.ConfigWorkflow``) with the benchmark's
overrides, scores the validation pairs with the identity map (zero field) and the untrained network, runs the
trainer and returns, per epoch, the mean of every term of the objective (the ``RegistrationStep`` output), the
learning rate of the epoch and the mean validation Dice of each dataset. The Dice is read from the evaluator's
``LabelDice`` details (its ``[pairs, labels]`` table), so each dataset is scored over its own labels although the
evaluator scores them all together.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()


def dataset_json(name: str) -> Path:
    """``<shared data>/<name>/<name>_dataset.json``."""
    return DATA / name / f"{name}_dataset.json"


@dataclass
class Epoch:
    """One epoch of training: the means of the objective's terms (``"loss"`` and its parts), the learning rate of its
    first iteration and the mean validation Dice of each dataset after it."""

    epoch: int
    terms: dict[str, float]
    learning_rate: float
    dice: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    """What :func:`train_bundle` measured, and the parsed workflow (to read more of it: the network, the data)."""

    identity_dice: dict[str, float]
    untrained_dice: dict[str, float]
    epochs: list[Epoch]
    workflow: ConfigWorkflow


class EpochMeans:
    """Trainer handler: the mean of every scalar of ``engine.state.output`` over each epoch (``"image"`` skipped)."""

    def __init__(self) -> None:
        self.epochs: list[Epoch] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._learning_rate = math.nan

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._add)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end)

    def _start(self, engine: Any) -> None:
        self._sums, self._count = {}, 0
        self._learning_rate = float(engine.optimizer.param_groups[0]["lr"])

    def _add(self, engine: Any) -> None:
        output = engine.state.output
        output = output[0] if isinstance(output, list) else output  # MONAI may decollate it
        for name, value in output.items():
            if name != "image":
                self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def _end(self, engine: Any) -> None:
        terms = {name: total / self._count for name, total in self._sums.items()}
        self.epochs.append(Epoch(engine.state.epoch, terms, self._learning_rate))


class DatasetDice:
    """Evaluator handler: after each run, the mean Dice of each dataset's pairs over that dataset's labels.

    Args:
        pairs: the evaluator's data (in its order), each named by ``"dataset"`` (``default`` when it has none).
        columns: the label values of the evaluator's ``LabelDice``, in the order of its table's columns.
        labels: dataset name -> the label values its Dice averages.
        default: the dataset of pairs without a ``"dataset"``.
        metric: the name of the evaluator's ``LabelDice``.
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        columns: Sequence[int],
        labels: Mapping[str, Sequence[int]],
        default: str = "",
        metric: str = "val_dice",
    ) -> None:
        self.names = [pair.get("dataset", default) for pair in pairs]
        self.columns = {name: [list(columns).index(v) for v in values] for name, values in labels.items()}
        self.metric = metric
        self.runs: list[dict[str, float]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        table = torch.as_tensor(engine.state.metric_details[self.metric]).reshape(len(self.names), -1)
        scores: dict[str, float] = {}
        for name, columns in self.columns.items():
            rows = [i for i, pair_dataset in enumerate(self.names) if pair_dataset == name]
            per_pair = table[rows][:, columns].nanmean(dim=1)
            scores[name] = float(per_pair.mean())
        self.runs.append(scores)


class ZeroField(torch.nn.Module):
    """The identity map: a zero field ``[B, 3, *S]`` for a stacked pair ``[B, 2C, *S]`` (conditions ignored)."""

    def forward(self, image: torch.Tensor, *args: Any, **conditions: Any) -> torch.Tensor:
        return image.new_zeros(image.shape[0], 3, *image.shape[2:])


def train_bundle(
    bundle: str, overrides: Mapping[str, Any], labels: Mapping[str, Sequence[int]], default_dataset: str = ""
) -> Result:
    """Train ``bundles/<bundle>/configs/train.yaml`` with ``overrides`` (config id -> value; ``output_dir`` is a
    temporary folder, TensorBoard off, no resume), validating after every epoch.

    Args:
        bundle: the bundle's folder name (``sacbnet``, ``unigradicon``, ``promptreg``, ``unireg``).
        overrides: config ids and their values; they must set ``validation_labels`` to the values of ``labels``'
            lists (sorted), the columns of the evaluator's Dice table.
        labels: dataset name -> the label values its Dice averages.
        default_dataset: the dataset of validation pairs that name none.
    """
    configs = ROOT / "bundles" / bundle / "configs"
    with tempfile.TemporaryDirectory() as output:
        settings = {"output_dir": output, "tensorboard": False, "resume": False, **overrides}
        workflow = ConfigWorkflow(
            config_file=str(configs / "train.yaml"),
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            bundle_root=str(ROOT / "bundles" / bundle),
            **settings,
        )
        workflow.initialize()
        parser = workflow.parser
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")
        dice = DatasetDice(
            parser.get_parsed_content("validate#dataset").data,
            parser.get_parsed_content("validation_labels"),
            labels,
            default_dataset,
        )
        dice.attach(evaluator)
        network = evaluator.network
        evaluator.network = ZeroField()
        evaluator.run()
        evaluator.network = network
        evaluator.run()
        means = EpochMeans()
        means.attach(trainer)
        workflow.run()
        workflow.finalize()
    identity, untrained, *after = dice.runs
    for epoch, scores in zip(means.epochs, after):
        epoch.dice = scores
    return Result(identity, untrained, means.epochs, workflow)


def union(labels: Mapping[str, Sequence[int]]) -> list[int]:
    """The sorted union of the datasets' label values (the ``validation_labels`` override)."""
    return sorted({int(v) for values in labels.values() for v in values})


def print_table(result: Result, parts: Sequence[str], datasets: Sequence[str]) -> None:
    """Print the epochs as a table: loss, the objective's ``parts`` (blank when absent), lr, Dice per dataset."""
    heading = " ".join(f"{name:>15}" for name in parts)
    print(f"\n{'epoch':>5} {'loss':>8} {heading} {'lr':>9} " + " ".join(f"{name:>12}" for name in datasets))
    untrained = " ".join(f"{result.untrained_dice[name]:>12.4f}" for name in datasets)
    blank = " ".join(" " * 15 for _ in parts)
    print(f"{0:>5} {'':>8} {blank} {'':>9} {untrained}")
    for epoch in result.epochs:
        values = " ".join(f"{epoch.terms[name]:>15.5f}" if name in epoch.terms else f"{'':>15}" for name in parts)
        scores = " ".join(f"{epoch.dice[name]:>12.4f}" for name in datasets)
        print(f"{epoch.epoch:>5} {epoch.terms['loss']:8.5f} {values} {epoch.learning_rate:9.2e} {scores}")


def summary(result: Result, datasets: Sequence[str], seconds: float) -> str:
    """``loss a -> b (fell); <dataset> Dice c -> d (rose; identity map e); ...; N s`` (first to last epoch)."""
    first, last = result.epochs[0].terms["loss"], result.epochs[-1].terms["loss"]
    verdict = "fell" if last < first else "DID NOT FALL"
    text = f"loss (epoch 1 -> {len(result.epochs)}) {first:.5f} -> {last:.5f} ({verdict})"
    for name in datasets:
        before, after = result.untrained_dice[name], result.epochs[-1].dice[name]
        text += (
            f"; {name} Dice {before:.4f} -> {after:.4f} ({'rose' if after > before else 'DID NOT RISE'}; "
            f"identity map {result.identity_dice[name]:.4f})"
        )
    return text + f"; {seconds:.0f} s"


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every short-training benchmark takes: ``--validation-pairs``, ``--threads``, ``--seed``."""
    parser.add_argument("--validation-pairs", type=int, default=None, help="first N per dataset (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


#: The shared datasets the benchmarks train on, and the key of their json that lists the labels their Dice averages.
LABEL_KEYS = {"BrainSynth": "dice_top30_labels", "ProstateMRUS": "evaluation_labels"}


def datasets(names: Sequence[str]) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """The ``*_dataset.json`` of each of ``names`` and the labels its Dice averages (:data:`LABEL_KEYS`)."""
    paths = {name: dataset_json(name) for name in names}
    return paths, {name: json.loads(path.read_text())[LABEL_KEYS[name]] for name, path in paths.items()}


def brainsynth(arguments: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Training and validation on BrainSynth alone: the overrides and ``{"BrainSynth": its 30 largest labels}``."""
    paths, labels = datasets(["BrainSynth"])
    path = str(paths["BrainSynth"])
    return {"datasets": [path], "validation_json": path, "max_validation_pairs": arguments.validation_pairs}, labels


def run_benchmark(
    bundle: str,
    arguments: argparse.Namespace,
    overrides: Mapping[str, Any],
    labels: Mapping[str, Sequence[int]],
    parts: Sequence[str],
    default_dataset: str = "",
) -> Result:
    """:func:`train_bundle` with the settings every benchmark shares (``epochs``, ``pairs_per_dataset``,
    ``learning_rate`` and ``seed`` from ``arguments``, ``validation_labels`` the union of ``labels``) and
    ``overrides``, on ``arguments.threads`` threads; prints the table (the objective's ``parts``) and the summary."""
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    settings = {
        "epochs": arguments.epochs,
        "pairs_per_dataset": arguments.pairs,
        "learning_rate": arguments.learning_rate,
        "seed": arguments.seed,
        "validation_labels": union(labels),
        **overrides,
    }
    result = train_bundle(bundle, settings, labels, default_dataset)
    print_table(result, parts, list(labels))
    print(summary(result, list(labels), time.perf_counter() - started))
    return result
