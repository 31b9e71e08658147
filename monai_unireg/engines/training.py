"""The training loop shared by the learned registration methods (uniGradICON, SACB-Net, ...).

:func:`train_registration` trains any network ``network(moving, fixed) -> ddf`` with any objective
``objective(model, batch) -> LossTerms`` on the pairs of a :class:`~monai_unireg.data.PairSampler`: every epoch
draws its pairs, a ``loader`` reads each into tensors at the network's working size (:class:`PairLoader`), an
optional augmentation transforms the batch, and the optimiser (Adam by default) takes one step per batch, with an
optional learning-rate schedule stepped once per iteration (:func:`polynomial_decay`).

Checkpoints are plain dictionaries of state dicts (the network's ``config`` and weights, optimiser, scheduler,
sampler, epoch, history), written atomically after every epoch; training resumes from one exactly (the pairs, the
augmentation stream and the objective's random stream of an epoch depend only on the seed, the epoch number and
the process rank).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_unireg import io, spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines.pair_registration import detect_modality, normalise_intensity, read_volume
from monai_unireg.metrics import LabelDiceMetric
from monai_unireg.validation import check_bool, check_integer, check_number, check_positive

__all__ = [
    "CT_WINDOW",
    "LossTerms",
    "PairLoader",
    "polynomial_decay",
    "train_registration",
    "validation_dice",
]

#: HU window of uniGradICON's and SACB-Net's CT preprocessing (mapped to [0, 1]).
CT_WINDOW = (-1000.0, 1000.0)

Log = Callable[[str], None]
Batch = dict[str, torch.Tensor]
Augmentation = Callable[[Batch, torch.Generator], Batch]
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


class LossTerms:
    """An objective's value: ``total`` (the scalar that is minimised) and its named parts (scalars with gradients).

    Parts are read as attributes (``terms.similarity``) or from :attr:`parts`; :meth:`as_floats` gives the values
    the training history and the progress lines record, ``total`` under the name ``"loss"``.

    Args:
        total: the loss.
        parts: its named terms (unweighted, as the objective defines them).
    """

    def __init__(self, total: torch.Tensor, **parts: torch.Tensor) -> None:
        if "loss" in parts:
            raise ValueError("parts must not be named 'loss' (the name of total in as_floats).")
        self.total = total
        self.parts = parts

    def __getattr__(self, name: str) -> torch.Tensor:
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"LossTerms has no part {name!r}; its parts are {sorted(parts)}.")

    def as_floats(self) -> dict[str, float]:
        """``{"loss": total, **parts}`` as Python floats (for logs and the history)."""
        return {"loss": float(self.total.detach()), **{k: float(v.detach()) for k, v in self.parts.items()}}


Objective = Callable[[nn.Module, Batch], LossTerms]


def _increasing_pair(values: Sequence[float], name: str, letter: str) -> tuple[float, float]:
    """``values`` as ``(low, high)`` floats, ``low < high`` (the error calls them ``<letter>_min, <letter>_max``)."""
    pair = tuple(float(check_number(v, name)) for v in values)
    if len(pair) != 2 or pair[0] >= pair[1]:
        raise ValueError(
            f"{name} must be ({letter}_min, {letter}_max) with {letter}_min < {letter}_max, got {tuple(values)!r}."
        )
    return pair


class PairLoader:
    """Read a pair dictionary of a :class:`~monai_unireg.data.PairSampler` into network inputs at a working size.

    Each image is read with its own grid, brought to ``intensity_range`` (CT: the HU window ``ct_window``; MRI:
    [min, 99th percentile]; the modality detected per image, :func:`~monai_unireg.engines.detect_modality`) and
    resized to ``size`` (trilinear, corner-aligned; ours: uniGradICON's reference resizes with
    ``align_corners=False`` and SACB-Net's data come at the working size already), with no physical-space alignment.
    Labels, when the pair names them, are resized by nearest neighbour.

    Args:
        size: working size ``(D, H, W)`` (the network's ``input_size``).
        ct_window: ``(a_min, a_max)`` HU window (uniGradICON and SACB-Net: [-1000, 1000]).
        intensity_range: ``(b_min, b_max)`` of the normalised images ([0, 1]; UniReg: [-1, 1]).

    Returns (when called on a pair):
        ``{"moving", "fixed"}`` ``[1, *size]`` float32 and, if available, ``"moving_label"``, ``"fixed_label"``
        ``[1, *size]`` int64.
    """

    def __init__(
        self,
        size: Sequence[int],
        ct_window: Sequence[float] = CT_WINDOW,
        intensity_range: Sequence[float] = (0.0, 1.0),
    ) -> None:
        self.size = tuple(check_integer(s, "size", 1) for s in size)
        if len(self.size) != 3:
            raise ValueError(f"size must hold 3 positive integers (D, H, W), got {tuple(size)!r}.")
        self.ct_window = _increasing_pair(ct_window, "ct_window", "a")
        self.intensity_range = _increasing_pair(intensity_range, "intensity_range", "b")

    def __call__(self, pair: dict[str, Any]) -> Batch:
        item: Batch = {}
        for role in ("moving", "fixed"):
            image, _ = read_volume(pair[f"{role}_image"], f"{role}_image")
            image = normalise_intensity(image.float(), detect_modality(image), self.ct_window, self.intensity_range)
            item[role] = spatial.resize_image(image, self.size)[0]
            if pair.get(f"{role}_label"):
                label, _ = read_volume(pair[f"{role}_label"], f"{role}_label")
                item[f"{role}_label"] = spatial.resize_image(label.float(), self.size, mode="nearest")[0].long()
        return item


def validation_dice(
    network: nn.Module,
    pairs: Sequence[dict[str, Any]],
    loader: Callable[[dict[str, Any]], Batch],
    device: torch.device,
    labels: Sequence[int] | None = None,
    condition_keys: Sequence[str] = (),
) -> float:
    """Mean label Dice of ``network`` over ``pairs`` at the working size (labels warped without interpolation).

    Args:
        network: registration network (put in eval mode for the evaluation, restored afterwards).
        pairs: pair dictionaries with labels (and, optionally, the ``"evaluation_labels"`` of their dataset).
        loader: reads and resizes each pair (e.g. :class:`PairLoader`).
        device: where to run the network.
        labels: label values to score (``None``: each pair's ``"evaluation_labels"``, or all non-zero labels of its
            fixed label map when it has none).
        condition_keys: keys of the loaded pair passed on to the network as keyword arguments (UniReg: ``"task"``,
            ``"reg_type"``), each with a batch axis added.
    """
    was_training = network.training
    network.eval()
    scores = []
    with torch.no_grad():
        for pair in pairs:
            item = loader(pair)
            if "moving_label" not in item or "fixed_label" not in item:
                raise ValueError(f"validation pair {pair.get('fixed_image')} has no labels to compute Dice with.")
            missing = [key for key in condition_keys if key not in item]
            if missing:
                raise ValueError(f"validation pair {pair.get('fixed_image')} has no {missing} for the network.")
            conditions = {key: item[key][None].to(device) for key in condition_keys}
            ddf = network(item["moving"][None].to(device), item["fixed"][None].to(device), **conditions).cpu()
            warped = spatial.warp_labels(item["moving_label"][None], ddf)
            scored = labels if labels is not None else pair.get("evaluation_labels")
            dice = LabelDiceMetric(labels=scored)(warped, item["fixed_label"][None])
            scores.append(float(dice.nanmean()))
    network.train(was_training)
    return sum(scores) / len(scores)


def polynomial_decay(
    optimizer: torch.optim.Optimizer, total_iterations: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial learning-rate decay, stepped once per iteration: ``lr = lr0 * (1 - it / total_iterations) ** power``.

    ``it`` counts the iterations done (``0`` for the first step, ``total_iterations - 1`` for the last, so the last
    step still has a positive rate); the rate is ``lr0 * max(0, 1 - it / total) ** power``, computed in closed form
    (PromptReg and SACB-Net: power 0.9). Pass ``functools.partial(polynomial_decay, power=p)`` as the
    ``scheduler_factory`` of :func:`train_registration`.

    Args:
        optimizer: the optimiser whose learning rates decay (``lr0``: their rates now).
        total_iterations: iterations of the whole training.
        power: the exponent.
    """
    total = check_integer(total_iterations, "total_iterations", 1)
    power = float(check_positive(power, "power"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: max(0.0, 1.0 - iteration / total) ** power)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream) % (2**63)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``0, 1`` without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shared_pairs(count: int, world: int) -> int:
    """Pairs of an epoch used by ``world`` processes: a multiple of ``world``, so all take as many steps."""
    shared = count - count % world
    if shared == 0:
        raise ValueError(f"an epoch has {count} pairs, fewer than the {world} processes.")
    return shared


def _batches(items: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def _stack(items: list[Batch], device: torch.device) -> Batch:
    """The batch of ``items``: every key that all items have, stacked to ``[B, ...]`` on ``device``."""
    if any("moving" not in item or "fixed" not in item for item in items):
        raise ValueError("loader must return a dictionary with 'moving' and 'fixed' images for every pair.")
    shared = [key for key in items[0] if all(key in item for item in items)]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in shared}


def train_registration(
    network: nn.Module,
    objective: Objective,
    sampler: PairSampler,
    loader: Callable[[dict[str, Any]], Batch],
    output_dir: str | os.PathLike,
    epochs: int,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    optimizer_factory: OptimizerFactory = torch.optim.Adam,
    parameter_groups: Callable[[float], list[dict[str, Any]]] | None = None,
    scheduler_factory: SchedulerFactory | None = None,
    augmentation: Augmentation | None = None,
    validation_pairs: Sequence[dict[str, Any]] = (),
    validation_labels: Sequence[int] | None = None,
    validation_conditions: Sequence[str] = (),
    device: str | torch.device = "cpu",
    amp: bool = False,
    resume: bool = True,
    seed: int = 0,
    max_iterations_per_epoch: int | None = None,
    distributed_model: nn.Module | None = None,
    log: Log = print,
) -> list[dict[str, float]]:
    """Train ``network`` with ``objective`` on the pairs of ``sampler``; one checkpoint per epoch.

    Every iteration reads ``batch_size`` pairs with ``loader``, stacks them into a batch ``{"moving", "fixed":
    [B, C, *S]}`` on ``device`` (plus ``"moving_label"``, ``"fixed_label"`` ``[B, 1, *S]`` and any other key the
    loader returns, when *every* pair of the batch has it), applies ``augmentation(batch, generator)``, evaluates
    ``objective(model, batch)`` (``model``: ``distributed_model`` or ``network``), takes one optimiser step on
    ``terms.total`` and then one scheduler step.

    ``<output_dir>/checkpoint.pt`` holds ``{"method", "config", "model", "optimizer", "sampler", "epoch",
    "history"}`` (plus ``"scheduler"`` with a scheduler and ``"scaler"`` with AMP) after every epoch;
    ``<output_dir>/model.pt`` holds
    ``{"method", "config", "model"}`` alone (what inference loads; ``method`` is the network's class name, so a
    loader refuses another method's file by name; ``config`` is ``network.config``, the constructor
    arguments). Both are written atomically (:func:`monai_unireg.io.atomic_path`): a crash leaves the previous ones
    intact. When ``checkpoint.pt`` exists and ``resume`` is on, training continues from it: an interrupted run
    called again with the same arguments ends exactly as an uninterrupted one. The augmentation generator and the
    objective's random stream (``objective.reseed(seed)``, when the objective has that method) are reseeded every
    epoch from ``(seed, epoch, rank)``, so an epoch's draws do not depend on the epochs before it; networks and
    objectives must take any other random numbers from their own seeded generators. A schedule spans ``epochs``:
    resuming with more epochs stretches the rest of it (the iteration count is restored, the total is new).

    Args:
        network: ``network(moving, fixed) -> ddf``, with a ``config`` dictionary of constructor arguments.
        objective: ``objective(model, batch) -> LossTerms``.
        sampler: the pairs of every epoch (its state is checkpointed).
        loader: reads a pair dictionary into tensors ``[C, *S]`` (e.g. :class:`PairLoader`).
        output_dir: checkpoint folder.
        epochs: total number of epochs, resumed ones included.
        batch_size: pairs per iteration (and process).
        learning_rate: initial learning rate, given to ``optimizer_factory``.
        optimizer_factory: ``optimizer_factory(parameters, lr=learning_rate)`` (default Adam; e.g.
            ``functools.partial(torch.optim.SGD, momentum=0.99)``).
        parameter_groups: ``parameter_groups(learning_rate)`` gives the optimiser's parameter groups (e.g. a part
            of the network with its own rate); ``None``: all of ``network.parameters()`` at ``learning_rate``.
        scheduler_factory: ``scheduler_factory(optimizer, total_iterations)`` gives a scheduler stepped once per
            iteration (``total_iterations = epochs * iterations per epoch``; e.g. :func:`polynomial_decay`);
            ``None``: a constant rate.
        augmentation: ``augmentation(batch, generator) -> batch`` (``None``: none).
        validation_pairs: labelled pairs scored (mean Dice, :func:`validation_dice`) after every epoch.
        validation_labels: label values for that Dice (``None``: all non-zero labels).
        validation_conditions: keys of each loaded validation pair given to the network as keyword arguments (see
            :func:`validation_dice`; UniReg: ``("task", "reg_type")``).
        device: training device.
        amp: automatic mixed precision (CUDA only; ignored on the CPU).
        resume: continue from ``checkpoint.pt`` when present.
        seed: seed of the augmentation and objective streams (the sampler has its own).
        max_iterations_per_epoch: cap on iterations per epoch (quick experiments and tests).
        distributed_model: the ``DistributedDataParallel`` wrapper of ``network`` when training with several
            processes: each rank takes every ``world_size``-th pair of the epoch (cut to a multiple of
            ``world_size``, so all take as many steps) with its own augmentation and objective streams; rank 0
            validates, writes checkpoints and logs.
        log: progress output.

    Returns:
        the history: one dictionary per epoch (``epoch``, the mean of every loss term over the iterations that
        reported it, ``seconds``, ``validation_dice`` with validation pairs, ``learning_rate`` after the epoch with
        a scheduler).

    Raises:
        ValueError: an invalid argument, a network without ``config``, fewer pairs per epoch than processes, or a
            checkpoint whose scheduler state does not match ``scheduler_factory``.
        FloatingPointError: the loss became NaN or infinite.
    """
    check_integer(epochs, "epochs", 1)
    check_integer(batch_size, "batch_size", 1)
    check_positive(learning_rate, "learning_rate")
    check_bool(amp, "amp")
    check_bool(resume, "resume")
    check_integer(seed, "seed", 0)
    if max_iterations_per_epoch is not None:
        check_integer(max_iterations_per_epoch, "max_iterations_per_epoch", 1)
    if not isinstance(getattr(network, "config", None), dict):
        raise ValueError(
            f"network ({type(network).__name__}) must have a 'config' dictionary of its constructor arguments, "
            "stored in the checkpoints so that the network can be rebuilt from them."
        )
    device = torch.device(device)
    output = Path(output_dir)
    rank, world = _rank_and_world()
    if rank == 0:  # temporaries of a run killed while saving (finished files are always complete)
        io.remove_stale_temporaries(output)
    model = distributed_model or network
    network.to(device)
    parameters = network.parameters() if parameter_groups is None else parameter_groups(learning_rate)
    optimizer = optimizer_factory(parameters, lr=learning_rate)
    per_epoch = math.ceil(_shared_pairs(len(sampler), world) // world / batch_size)
    per_epoch = min(per_epoch, max_iterations_per_epoch or per_epoch)
    scheduler = scheduler_factory(optimizer, epochs * per_epoch) if scheduler_factory is not None else None
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, history = 0, []
    checkpoint_path = output / "checkpoint.pt"
    if resume and checkpoint_path.exists():
        state = io.load_weights(checkpoint_path, "checkpoint to resume")
        if not isinstance(state, dict) or not {"model", "optimizer", "sampler"} <= state.keys():
            raise ValueError(
                f"checkpoint to resume {str(checkpoint_path)!r} is not a training checkpoint (it needs 'model', "
                "'optimizer' and 'sampler'); remove it or choose another output_dir."
            )
        io.check_checkpoint_method(state, type(network).__name__, checkpoint_path)
        if ("scheduler" in state) != (scheduler is not None):
            raise ValueError(
                f"checkpoint {checkpoint_path} was written {'with' if 'scheduler' in state else 'without'} a "
                f"learning-rate scheduler, but scheduler_factory is {scheduler_factory!r}; resume with the same "
                "schedule or set resume=False."
            )
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if use_amp and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            log(f"resumed from {checkpoint_path} at epoch {start_epoch}")
    reseed = getattr(objective, "reseed", None)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        pairs = sampler.pairs_for_epoch(epoch)
        shared = _shared_pairs(len(pairs), world)
        batches = _batches(pairs[:shared][rank::world], batch_size)[:max_iterations_per_epoch]
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 2 * rank))
        if callable(reseed):
            reseed(_epoch_seed(seed, epoch, 2 * rank + 1))
        network.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        started = time.perf_counter()
        for iteration, pair_batch in enumerate(batches, start=1):
            batch = _stack([loader(pair) for pair in pair_batch], device)
            if augmentation is not None:
                batch = augmentation(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                terms = objective(model, batch)
            if not torch.isfinite(terms.total):
                raise FloatingPointError(
                    f"the loss became {float(terms.total.detach())} at epoch {epoch + 1}, iteration {iteration}."
                )
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            values = terms.as_floats()
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            if rank == 0:
                rate = iteration / (time.perf_counter() - started)
                log(
                    f"epoch {epoch + 1}/{epochs} iteration {iteration}/{len(batches)} "
                    + " ".join(f"{k} {v:.5f}" for k, v in values.items())
                    + (f" lr {scheduler.get_last_lr()[0]:.3g}" if scheduler is not None else "")
                    + f" ({rate:.2f} it/s)"
                )
        record: dict[str, float] = {name: value / counts[name] for name, value in totals.items()}
        record.update(epoch=epoch + 1, seconds=time.perf_counter() - started)
        if scheduler is not None:
            record["learning_rate"] = scheduler.get_last_lr()[0]
        if validation_pairs and rank == 0:
            record["validation_dice"] = validation_dice(
                network, validation_pairs, loader, device, validation_labels, validation_conditions
            )
        history.append(record)
        if rank == 0:
            log(
                f"epoch {epoch + 1}/{epochs} done: "
                + ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.5g}" for k, v in record.items())
            )
            _save_checkpoint(output, network, optimizer, sampler, epoch + 1, history, scheduler, scaler)
    return history


def _save_checkpoint(
    output: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: PairSampler,
    epoch: int,
    history: list[dict[str, float]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler,
) -> None:
    """Write ``checkpoint.pt`` and ``model.pt`` (``{"config", "model"}``, what inference loads) atomically; a crash
    leaves the previous ones intact."""
    output.mkdir(parents=True, exist_ok=True)
    state = {
        "method": type(network).__name__,
        "config": network.config,
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    with io.atomic_path(output / "checkpoint.pt") as temporary:
        torch.save(state, temporary)
    with io.atomic_path(output / "model.pt") as temporary:
        torch.save({key: state[key] for key in ("method", "config", "model")}, temporary)
