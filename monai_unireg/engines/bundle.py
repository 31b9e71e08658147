"""The registration pieces MONAI's bundle workflows lack, used by the bundles' configs.

A bundle config wires MONAI parts (``LoadImaged``, ``EnsureChannelFirstd``, ``Dataset``, ``DataLoader``,
``SupervisedEvaluator``, ``CheckpointLoader``, ...) around a :class:`~monai_unireg.networks.nets.PairInput` network
(one 2-channel ``[moving, fixed]`` ``image``); what registration adds sits here:

- :class:`ResizeInferer`: runs the network at its working size and brings the field back to the pair's grid;
- :class:`RegistrationWriter`: an evaluator handler writing, per pair, the ITK displacement field, the warped image
  and label, ``metrics.json`` (Dice, HD95, SDlogJ, folding, runtime) and ``overview.png``;
- :class:`RegistrationTable`: an evaluator handler writing the per-pair table and its summary after the run;
- :func:`gather_rows`: those rows of every ``torch.distributed`` rank, in the pairs' order, on rank 0;
- :func:`pair_items`: the data list of a Learn2Reg section or folder of pairs, each item named;

and for training with ``SupervisedTrainer``:

- :func:`prepare_pair_batch`: the trainer's ``prepare_batch``: the stacked ``image`` and the pair for the objective;
- :class:`RegistrationStep`: the trainer's ``iteration_update``: one optimiser step on the method's objective
  (which may call the network more than once, e.g. uniGradICON's both directions);
- :class:`EpochPairs`: sets the epoch of an :class:`~monai_unireg.data.EpochPairDataset` as each epoch starts, and
  saves/restores the sampler (a ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict`` entry);
- :class:`RandomState`: the Python, NumPy and torch random states as a ``save_dict`` entry (bit-exact resume);
- :class:`TransformRandomState`: the random states of a ``Compose``'s random transforms, likewise;
- :class:`NetworkConfig`: a network's ``config`` as a ``save_dict`` entry (a ``model.pt`` that rebuilds its network);
- :func:`latest_checkpoint`: the newest ``checkpoint_epoch=N.pt`` of a training folder, for resuming;

and :func:`check_overrides` / :func:`check_settings`, the configs' ``initialize`` checks: a misspelt command-line
key, or a value of the wrong kind, fails with a ``ValueError`` naming the key.
"""

from __future__ import annotations

import copy
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import Inferer

from monai_unireg import spatial
from monai_unireg.data import EpochPairDataset, load_learn2reg, load_pair_folder, pair_name
from monai_unireg.engines.pair_registration import (
    LoadedPair,
    RegistrationResult,
    evaluate_result,
    write_results,
    write_table,
)
from monai_unireg.validation import check_integer, plain_tensor

__all__ = [
    "PAIR_KEYS",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "ResizeInferer",
    "PyramidDepthInferer",
    "RegistrationWriter",
    "RegistrationTable",
    "gather_rows",
    "pair_items",
    "batch_tensor",
    "prepare_pair_batch",
    "RegistrationStep",
    "EpochPairs",
    "RandomState",
    "TransformRandomState",
    "NetworkConfig",
    "gather_rows",
    "latest_checkpoint",
    "check_overrides",
    "check_settings",
]

#: The keys of a pair item: images and (optional) label maps.
IMAGE_KEYS = ("fixed_image", "moving_image")
LABEL_KEYS = ("fixed_label", "moving_label")
PAIR_KEYS = IMAGE_KEYS + LABEL_KEYS


def pair_items(dataset_json: str | os.PathLike | None, section: str, pairs_dir: str | os.PathLike | None = None):
    """The data list of an inference run: the pairs of ``pairs_dir`` when given, else of ``dataset_json``'s
    ``section``; each a dict of file paths (:data:`PAIR_KEYS`, labels when present) and its ``"pair"`` name
    (:func:`~monai_unireg.data.pair_name`, the name of its output folder)."""
    pairs = load_pair_folder(pairs_dir) if pairs_dir else load_learn2reg(dataset_json, section)
    return [{**pair, "pair": pair_name(pair)} for pair in pairs]


class ResizeInferer(Inferer):
    """``inferer(image, network)``: register the stacked ``[moving, fixed]`` ``image`` ``[B, 2C, *S]`` at the
    network's working size ``size`` (both images resized trilinearly, corner-aligned) and return the displacement
    ``[B, 3, *S]`` in voxels of the input grid (values rescaled, :func:`~monai_unireg.spatial.resize_ddf`).

    Args:
        size: the working size (e.g. SACB-Net's paper sizes, multiples of 16); ``None``: the network runs on the
            input as it is (networks that resize themselves, e.g. uniGradICON).
    """

    def __init__(self, size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.size = None if size is None else tuple(check_integer(s, "size", 1) for s in size)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = tuple(inputs.shape[2:])
        if self.size is None or shape == self.size:
            return network(inputs, *args, **kwargs)
        if len(self.size) != len(shape):
            raise ValueError(f"the inferer's size {self.size} and the image's spatial shape {shape} differ in rank.")
        ddf = network(spatial.resize_image(plain_tensor(inputs), self.size), *args, **kwargs)
        return spatial.resize_ddf(ddf, shape)


class PyramidDepthInferer(Inferer):
    """``inferer(image, network)`` for a :class:`~monai_unireg.networks.nets.PairInput` of a
    :class:`~monai_unireg.networks.nets.VoxelOpt`: each pair runs with ``num_levels`` optimised levels, but no more
    than keep ``coarsest`` voxels along every axis at the coarsest one
    (:meth:`~monai_unireg.networks.nets.VoxelOpt.levels_for` on the grid after ``finest_level`` halvings), so small
    volumes get a shallower pyramid; the network's other settings are used as they are.

    Args:
        coarsest: fewest voxels per axis at the coarsest level (8: the paper's 192x160x256 keep 10 at 5 levels).
    """

    def __init__(self, coarsest: int = 8) -> None:
        super().__init__()
        self.coarsest = check_integer(coarsest, "coarsest", 2)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        voxelopt = network.network
        shape = [int(s) // 2**voxelopt.finest_level for s in inputs.shape[2:]]
        levels = voxelopt.levels_for(shape, self.coarsest, voxelopt.num_levels)
        if levels == voxelopt.num_levels:
            return network(inputs, *args, **kwargs)
        shallower = copy.copy(voxelopt)  # the same modules and settings, fewer levels
        shallower.num_levels = levels
        return type(network)(shallower, network.conditions)(inputs, *args, **kwargs)


def _items(value: Any) -> list:
    """The per-pair items of an engine's (decollated or batched) ``state.batch`` / ``state.output``."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _volume(value: Any) -> torch.Tensor:
    """``[C, *S]`` (Meta)Tensor -> ``[1, C, *S]`` plain float32 CPU tensor."""
    return plain_tensor(torch.as_tensor(value)).detach().to("cpu", torch.float32)[None]


def _label(value: Any) -> torch.Tensor:
    return torch.round(_volume(value).to(torch.float64)).to(torch.int32)


class RegistrationWriter:
    """Evaluator handler: after every iteration, each pair's results into ``<output_dir>/<pair name>/``.

    Files (as the command line writes them, :func:`~monai_unireg.engines.write_results`): ``ddf.nii.gz`` (ITK/ANTs
    displacement field, LPS mm, on the fixed image's grid and affine), ``warped.nii.gz`` (the moving image in its
    original intensities, warped), ``warped_label.nii.gz`` (with a moving label), ``metrics.json`` (SDlogJ, %
    folding, runtime and, with both labels, Dice and HD95 in mm per label) and ``overview.png``. The rows (pair
    name + metrics, and the item's ``"dataset"`` when it has one) are kept in ``engine.state.registration_rows`` for
    :class:`RegistrationTable`.

    The pair item holds the fixed image, the moving image on the fixed grid in original intensities under
    ``original_key``, the optional labels, and its name under ``"pair"``; the network's field is the output
    ``pred``. The runtime is the iteration's (to device, inferer, post-processing).

    Args:
        output_dir: the results' folder.
        labels: label values averaged by Dice / HD95; ``None``: the non-zero values of each fixed label map.
        dataset_labels: per dataset name (an item's ``"dataset"``), the label values of its pairs (``None``: the
            non-zero fixed labels), used instead of ``labels`` for the items of those datasets.
        original_key: key of the moving image in original intensities (the network sees the normalised one).
        fixed_key: key of the fixed image (its affine places the field).
        log: progress output (one line per pair), e.g. ``logger.info``; ``None``: quiet.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        labels: Sequence[int] | None = None,
        original_key: str = "moving_original",
        fixed_key: str = "fixed_original",
        log: Any = None,
        dataset_labels: Mapping[str, Sequence[int] | None] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = None if labels is None else [check_integer(v, "labels") for v in labels]
        self.dataset_labels = {
            str(name): None if values is None else [check_integer(v, "dataset_labels") for v in values]
            for name, values in (dataset_labels or {}).items()
        }
        self.original_key, self.fixed_key = original_key, fixed_key
        self.log = log
        self._start = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.state.registration_rows = []
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Any) -> None:
        engine.state.registration_rows = []

    def _started(self, engine: Any) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Any) -> None:
        if torch.cuda.is_available() and engine.state.device.type == "cuda":
            torch.cuda.synchronize(engine.state.device)
        runtime = (time.perf_counter() - self._start) / max(len(_items(engine.state.output)), 1)
        total = len(engine.data_loader) if hasattr(engine.data_loader, "__len__") else None
        for item, output in zip(_items(engine.state.batch), _items(engine.state.output)):
            row = self.write(item, output["pred"], runtime)
            engine.state.registration_rows.append(row)
            if self.log is not None:
                dice = f"Dice {row['dice_mean']:.4f}, " if row.get("dice_mean") is not None else ""
                count = f"[{len(engine.state.registration_rows)}/{total}] " if total else ""
                self.log(f"{count}{row['pair']}: {dice}SDlogJ {row['sdlogj']:.4f}, {row['runtime_s']:.2f} s")

    def write(self, item: Mapping[str, Any], ddf: torch.Tensor, runtime: float) -> dict:
        """Write one pair's files; returns its row (``pair`` + metrics)."""
        fixed = item[self.fixed_key] if self.fixed_key in item else item["fixed_image"]
        affine = np.asarray(torch.as_tensor(fixed.affine, dtype=torch.float64).cpu())
        pair = LoadedPair(
            fixed=_volume(fixed),
            moving=_volume(item[self.original_key]),
            affine=affine,
            fixed_label=_label(item["fixed_label"]) if "fixed_label" in item else None,
            moving_label=_label(item["moving_label"]) if "moving_label" in item else None,
        )
        field = _volume(ddf)
        warped = spatial.warp(pair.moving, field, padding_mode="zeros")
        warped_label = (
            None if pair.moving_label is None else spatial.warp_labels(pair.moving_label, field, padding_mode="zeros")
        )
        result = RegistrationResult(field, warped, warped_label, runtime, item.get("modality", "auto"))
        dataset = item.get("dataset")
        labels = self.dataset_labels[dataset] if dataset in self.dataset_labels else self.labels
        metrics = evaluate_result(pair, result, labels)
        write_results(self.output_dir / item["pair"], pair, result, metrics)
        return {"pair": item["pair"], **metrics, **({} if dataset is None else {"dataset": dataset})}


class RegistrationTable:
    """Evaluator handler: when the run completes, the rows of :class:`RegistrationWriter` as ``csv_path`` (one row
    per pair: mean Dice, mean HD95 in mm, SDlogJ, % folding, runtime) and ``summary_path`` (mean, std, n per
    column), written by :func:`~monai_unireg.engines.write_table`. Attach it after the writer.

    In a ``torch.distributed`` run whose ranks register every ``world_size``-th pair (``multi_gpu_evaluate.yaml``:
    a ``DistributedSampler`` without shuffling), the rows of all ranks are gathered into one table, in the pairs'
    order, which rank 0 writes."""

    def __init__(self, csv_path: str | os.PathLike, summary_path: str | os.PathLike) -> None:
        self.csv_path, self.summary_path = Path(csv_path), Path(summary_path)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        rows = getattr(engine.state, "registration_rows", None)
        rows = gather_rows(rows)
        if rows is not None:
            engine.state.registration_summary = write_table(rows, self.csv_path, self.summary_path)


def gather_rows(rows: Sequence[dict] | None) -> list[dict] | None:
    """The per-pair rows of :class:`RegistrationWriter` of every rank, in the pairs' order, on rank 0 (``None`` on
    the other ranks); ``rows`` itself outside a ``torch.distributed`` run of several processes. In
    ``multi_gpu_evaluate.yaml`` rank ``r`` registers the pairs ``r, r + world_size, ...`` (a ``DistributedSampler``
    without shuffling).

    Raises:
        ValueError: ``rows`` is ``None`` (no ``RegistrationWriter`` before the table handler).
    """
    if rows is None:
        raise ValueError("a table handler needs a RegistrationWriter among the evaluator's handlers, before it.")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(rows))
        # rank r registered the pairs r, r + world_size, ...: interleave them back into the pairs' order
        rows = [part[k] for k in range(max(map(len, gathered))) for part in gathered if k < len(part)]
        if dist.get_rank() != 0:
            return None
    return list(rows)


def batch_tensor(value: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A batch entry as a plain tensor (a ``MetaTensor``'s metadata dropped) on ``device``: what the ``prepare_batch``
    functions of the registration engines hand to the network and the objective."""
    return plain_tensor(torch.as_tensor(value)).to(device=device, non_blocking=non_blocking)


def prepare_pair_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``prepare_batch`` of a registration ``SupervisedTrainer``: ``(image, pair)``, the stacked ``[moving, fixed]``
    ``image`` ``[B, 2C, *S]`` and ``pair`` = ``{"moving", "fixed"}`` ``[B, C, *S]`` plus ``moving_label`` /
    ``fixed_label`` when the batch has both (the objective's input, see :class:`RegistrationStep`), on ``device``.
    """

    for key in IMAGE_KEYS:
        if key not in batchdata:
            raise ValueError(f"a training batch needs {key!r} (the pair's images), got the keys {sorted(batchdata)}.")
    pair = {
        "moving": batch_tensor(batchdata["moving_image"], device, non_blocking),
        "fixed": batch_tensor(batchdata["fixed_image"], device, non_blocking),
    }
    if all(key in batchdata for key in LABEL_KEYS):
        pair.update(
            moving_label=batch_tensor(batchdata["moving_label"], device, non_blocking),
            fixed_label=batch_tensor(batchdata["fixed_label"], device, non_blocking),
        )
    return torch.cat([pair["moving"], pair["fixed"]], dim=1), pair


class RegistrationStep:
    """``iteration_update`` of a registration ``SupervisedTrainer``: one optimiser step on ``objective``.

    ``objective(network, pair) -> LossTerms`` is the method's objective (e.g.
    :class:`~monai_unireg.engines.SACBNetObjective`), called with ``network(moving, fixed) -> ddf`` (the trainer's
    network, a :class:`~monai_unireg.networks.nets.PairInput` possibly inside ``DistributedDataParallel``, fed the
    stacked pair; keyword conditions, e.g. UniReg's ``task`` and ``reg_type``, are passed on to the network) and
    the pair of :func:`prepare_pair_batch`. As MONAI's own iteration: the network in train mode,
    ``zero_grad``, the objective under ``torch.autocast`` with the trainer's ``amp`` (CUDA) and its grad scaler,
    backward, ``optimizer.step``, and the ``IterationEvents`` fired in order. The output is ``{"loss": total, **parts}``
    (detached scalars), what ``StatsHandler`` / ``TensorBoardStatsHandler`` log with
    ``output_transform=monai.handlers.from_engine(["loss"], first=True)``.
    """

    def __init__(self, objective: Any) -> None:
        if not callable(objective):
            raise ValueError(f"objective must be callable, objective(network, pair) -> LossTerms, got {objective!r}.")
        self.objective = objective

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from monai.engines.utils import IterationEvents

        if batchdata is None:
            raise ValueError("the training data loader gave no batch.")
        image, pair = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = {"image": image}
        network = engine.network
        registration = _PairCall(network)
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast("cuda", enabled=bool(engine.amp and engine.scaler is not None)):
            terms = self.objective(registration, pair)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(terms.total).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms.total.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.state.output.update(loss=terms.total.detach(), **{k: v.detach() for k, v in terms.parts.items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI's trainer may decollate the output here
        return engine.state.output


class _PairCall:
    """``call(moving, fixed, **conditions) -> ddf``: the trainer's ``network`` (a
    :class:`~monai_unireg.networks.nets.PairInput`, possibly in ``DistributedDataParallel``) fed the stacked pair and
    any keyword conditions (e.g. UniReg's per-pair ``task`` and ``reg_type``); ``module`` is that network, for
    objectives that read more of it than its field (uniGradICON's step fields), as a ``DistributedDataParallel``'s
    ``module``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, **conditions: Any) -> torch.Tensor:
        return self.module(torch.cat([moving, fixed], dim=1), **conditions)


class EpochPairs:
    """Trainer handler of an :class:`~monai_unireg.data.EpochPairDataset`: at every epoch start the dataset draws
    that epoch's pairs (``set_epoch(epoch - 1)``, a pure function of the sampler's seed and the epoch, so a resumed
    run sees the pairs it would have seen); its ``state_dict`` / ``load_state_dict`` (the sampler's) make it a
    ``CheckpointSaver`` / ``CheckpointLoader`` entry, which refuses a checkpoint of other datasets.

    Args:
        dataset: the training dataset.
    """

    def __init__(self, dataset: EpochPairDataset) -> None:
        if not isinstance(dataset, EpochPairDataset):
            raise ValueError(f"dataset must be a monai_unireg.data.EpochPairDataset, got {type(dataset).__name__}.")
        self.dataset = dataset

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        self.dataset.set_epoch(engine.state.epoch - 1)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.sampler.load_state_dict(dict(state))


class NetworkConfig:
    """A network's ``config`` (the settings it is built from, e.g. :class:`~monai_unireg.networks.nets.UniReg`'s) as
    a ``save_dict`` entry: saved beside the weights, so a ``model.pt`` rebuilds its network (the method's weights
    loader, e.g. ``monai-unireg register --weights``); loading a checkpoint of another configuration is refused.

    Args:
        network: the network (or a wrapper: ``PairInput``, ``DistributedDataParallel``) with a ``config`` dict.
    """

    def __init__(self, network: nn.Module) -> None:
        inner: Any = network
        while inner is not None and not isinstance(getattr(inner, "config", None), dict):
            inner = getattr(inner, "module", None) or getattr(inner, "network", None)  # DDP, PairInput
        if inner is None:
            raise ValueError(f"network must have a config dict (or wrap one that has), got {type(network).__name__}.")
        self.config = inner.config

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        differ = sorted(key for key in set(state) | set(self.config) if state.get(key) != self.config.get(key))
        if differ:
            settings = ", ".join(f"{key}={state.get(key)!r} (now {self.config.get(key)!r})" for key in differ)
            raise ValueError(
                f"the checkpoint was written for a network with {settings}; use the same settings, or start a new run "
                "(--resume False, or another output_dir)."
            )


class RandomState:
    """The Python, NumPy and torch (CPU and CUDA) random states as one ``save_dict`` entry: saved with the
    checkpoint and restored on resume, random transforms and dropout continue as in an uninterrupted run."""

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and lists only, so ``torch.load(weights_only=True)`` (``CheckpointLoader``) reads it."""
        version, values, gauss = random.getstate()
        _, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(values), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
        keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _randomizables(transform: Any) -> list:
    """Every ``Randomizable`` in ``transform``, depth first through ``Compose`` (itself included)."""
    from monai.transforms import Compose, Randomizable

    found = [transform] if isinstance(transform, Randomizable) else []
    for child in transform.transforms if isinstance(transform, Compose) else ():
        found += _randomizables(child)
    return found


class TransformRandomState:
    """The random states (``R``) of the random transforms of a ``Compose`` (e.g. ``train#preprocessing``) as one
    ``save_dict`` entry: saved with the checkpoint and restored on resume, a random augmentation continues as in an
    uninterrupted run (a MONAI ``DataLoader`` with ``num_workers=0`` runs the transforms in the main process; with
    workers their seeds come from torch's generator, which :class:`RandomState` restores).

    Args:
        transform: the ``Compose`` (or one transform) whose ``Randomizable`` members are saved.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def state_dict(self) -> dict[str, Any]:
        states = []
        for member in _randomizables(self.transform):
            _, keys, position, has_gauss, cached = member.R.get_state()
            states.append([torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)])
        return {"states": states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        members = _randomizables(self.transform)
        if len(state["states"]) != len(members):
            raise ValueError(
                f"the checkpoint holds the random states of {len(state['states'])} random transforms, but the "
                f"preprocessing has {len(members)}; resume with the same transforms, or --resume False."
            )
        for member, (keys, position, has_gauss, cached) in zip(members, state["states"]):
            member.R.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))


_CHECKPOINT = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(output_dir: str | os.PathLike, resume: bool = True) -> str | None:
    """The newest ``checkpoint_epoch=N.pt`` (highest ``N``) that ``CheckpointSaver`` wrote into ``output_dir``, or
    ``None`` when there is none or ``resume`` is false (a new run)."""
    if not resume or not Path(output_dir).is_dir():
        return None
    found = [(int(m.group(1)), path) for path in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(path.name))]
    return str(max(found)[1]) if found else None


#: Arguments of ``python -m monai.bundle run`` that are not config ids.
_RUN_ARGUMENTS = {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking",
                  "workflow_type", "workflow_name", "properties_path"}  # fmt: skip


def _config_ids(config: Any, prefix: str = "") -> set[str]:
    ids = set()
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        ids |= {name, name.replace("#", "::")}
        ids |= _config_ids(value, f"{name}#")
    return ids


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse a command-line override of ``python -m monai.bundle run`` that names no id of its configs.

    MONAI adds an unknown ``--key value`` to the config silently, so a misspelt key (``--dataset_jsn``) would leave
    the default in force. Reads ``argv`` (default ``sys.argv``); does nothing outside ``monai.bundle run`` (no
    ``--config_file`` in it).

    Raises:
        ValueError: naming the unknown key and the closest ids of the configs.
    """
    import ast
    import difflib
    import sys

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    keys = [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")]
    if "config_file" not in keys:
        return
    index = next(i for i, arg in enumerate(argv) if arg.split("=", 1)[0] == "--config_file")
    value = argv[index].split("=", 1)[1] if "=" in argv[index] else argv[index + 1]
    try:
        files = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        files = value
    known = _config_ids(ConfigParser.load_config_files(files))
    for key in keys:
        if key in _RUN_ARGUMENTS or key in known or key.split("#")[0].split("::")[0] in {"_meta_"}:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"--{key} is not a key of the bundle's configs ({value}){hint}")


_EXPECTED = {
    "int": "a whole number >= 0",
    "positive_int": "a whole number >= 1",
    "number": "a number",
    "bool": "True or False",
    "size": "one size or a list of sizes, whole numbers >= 1",
}


def check_settings(**settings: Any) -> None:
    """Check config values by kind: each keyword is a config id and ``(value, kind)``, ``kind`` one of ``"int"``
    (a whole number >= 0), ``"positive_int"`` (>= 1), ``"number"``, ``"bool"``, ``"size"`` (one int or a list of
    ints >= 1), or ``None``-able variants ending in ``"?"`` (``"int?"``).

    Raises:
        ValueError: naming the config id, for a value of the wrong kind (e.g. ``--epochs ten``).
    """
    import numbers

    for key, (value, kind) in settings.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if kind in ("int", "positive_int"):
            ok = whole and value >= (1 if kind == "positive_int" else 0)
        elif kind == "number":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "size":
            values = [value] if whole else value if isinstance(value, (list, tuple)) else None
            ok = values is not None and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values
            )
        else:
            raise ValueError(f"check_settings: unknown kind {kind!r} for {key!r}.")
        if not ok:
            expected = _EXPECTED[kind]
            raise ValueError(f"{key} must be {expected}{' or None' if optional else ''}, got {value!r}.")
