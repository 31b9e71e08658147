"""uniGradICON training (two stages), fine-tuning and instance optimisation.

The objective is the paper's Eq. 1, ``L = LNCC(A o phi_AB, B) + LNCC(B o phi_BA, A) + lambda GradICON`` with
LNCC on a Gaussian window of sigma 5 voxels and ``lambda = 1.5``; Adam with learning rate 5e-5; every epoch
draws the same number of random pairs from each dataset (:class:`~monai_unireg.data.PairSampler`); images are
brought to [0, 1] (CT: HU window [-1000, 1000]; MRI: [min, 99th percentile]) and resized to the network's
working size, then augmented (:class:`RandomPairAugmentation`).

Checkpoints are plain dictionaries of state dicts (model, optimiser, sampler, epoch, history), written
atomically after every epoch; training resumes from one exactly (the pairs, augmentations and GradICON jitter
of an epoch depend only on the seed and the epoch number).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg import io, spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines.pair_registration import detect_modality, normalise_intensity, read_volume
from monai_unireg.losses import GradICONLoss, LNCCLoss
from monai_unireg.metrics import LabelDiceMetric
from monai_unireg.networks.nets.unigradicon import UniGradICON
from monai_unireg.validation import check_bool, check_integer, check_positive

__all__ = [
    "GradICONObjective",
    "InstanceOptimised",
    "LossTerms",
    "RandomPairAugmentation",
    "PairLoader",
    "stage_two_from_stage_one",
    "train_unigradicon",
    "instance_optimise",
    "validation_dice",
    "UNIGRADICON_CT_WINDOW",
]

#: HU window of the paper's CT preprocessing (Sec. 2.1), mapped to [0, 1].
UNIGRADICON_CT_WINDOW = (-1000.0, 1000.0)

Log = Callable[[str], None]


@dataclass
class LossTerms:
    """The objective's value and its parts (scalars with gradients)."""

    total: torch.Tensor
    similarity: torch.Tensor
    gradicon: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """The three terms as Python floats (for logs and history)."""
        return {
            "loss": float(self.total.detach()),
            "similarity": float(self.similarity.detach()),
            "gradicon": float(self.gradicon.detach()),
        }


class GradICONObjective(nn.Module):
    """uniGradICON's training loss (paper Eq. 1) of a network on a pair ``(A, B)`` at its working size.

    ``L = LNCC(A o phi_AB, B) + LNCC(B o phi_BA, A) + lambda * GradICON(phi_AB, phi_BA)``, with
    ``phi_AB = network(A, B)`` and ``phi_BA = network(B, A)`` (two separate calls, as the reference code, so
    BatchNorm's training statistics are those of one direction). The network is called through ``forward`` so a
    ``DistributedDataParallel`` wrapper works (with ``static_graph=True``: the weights are used twice).

    Args:
        lam: GradICON weight (paper: 1.5).
        sigma: LNCC Gaussian window in voxels (paper: 5).
        squared: ``1 - mean(LNCC^2)``, offered for multimodal pairs (METHODS.md).
        seed: seed of the GradICON jitter's generator (reseeded per epoch by :func:`train_unigradicon`).
    """

    def __init__(self, lam: float = 1.5, sigma: float = 5.0, squared: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.lam = float(check_positive(lam, "lam", allow_zero=True))
        self.similarity = LNCCLoss(spatial_dims=3, kernel_type="gaussian", sigma=sigma, squared=squared)
        self.regulariser = GradICONLoss(seed=seed)

    def reseed(self, seed: int) -> None:
        """Restart the GradICON jitter's random sequence from ``seed``."""
        self.regulariser.generator.manual_seed(seed)

    def forward(self, network: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor) -> LossTerms:
        """Evaluate the objective.

        Args:
            network: maps ``(moving, fixed)`` at its working size to a ``[B, 3, *S]`` voxel field.
            image_a: ``[B, 1, *S]`` image A in [0, 1].
            image_b: ``[B, 1, *S]`` image B on the same grid.
        """
        ddf_ab = network(image_a, image_b)
        ddf_ba = network(image_b, image_a)
        similarity = self.similarity(spatial.warp(image_a, ddf_ab), image_b) + self.similarity(
            spatial.warp(image_b, ddf_ba), image_a
        )
        gradicon = self.regulariser(ddf_ab.float(), ddf_ba.float())
        return LossTerms(similarity + self.lam * gradicon, similarity, gradicon)


class RandomPairAugmentation:
    """The published augmentation: one random axis permutation with random flips for both images, then an
    independent small random affine for each (matrix entries + N(0, ``noise_std``^2), normalised coordinates).

    Applied to a batch ``[B, 1, *S]`` of pairs, sampled per pair from ``generator`` (seeded, CPU), resampled
    trilinearly with border padding.

    Args:
        noise_std: standard deviation of the affine perturbation (reference: 0.05).
        permute_flip: draw the axis permutation and flips (reference: on); off keeps the orientation, e.g. to
            fine-tune on one protocol.
    """

    def __init__(self, noise_std: float = 0.05, permute_flip: bool = True) -> None:
        self.noise_std = float(check_positive(noise_std, "noise_std", allow_zero=True))
        self.permute_flip = check_bool(permute_flip, "permute_flip")

    def matrices(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, 4]`` affine matrices for A and for B (``affine_grid`` convention)."""
        base = torch.zeros(batch, 3, 4)
        for sample in range(batch):
            order = torch.randperm(3, generator=generator) if self.permute_flip else torch.arange(3)
            signs = torch.randint(0, 2, (3,), generator=generator) * 2 - 1 if self.permute_flip else torch.ones(3)
            base[sample, torch.arange(3), order] = signs.float()
        noise_a = torch.randn(batch, 3, 4, generator=generator) * self.noise_std
        noise_b = torch.randn(batch, 3, 4, generator=generator) * self.noise_std
        return base + noise_a, base + noise_b

    def __call__(
        self, image_a: torch.Tensor, image_b: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented ``[B, 1, *S]`` copies of ``image_a`` and ``image_b``."""
        matrix_a, matrix_b = self.matrices(image_a.shape[0], generator)
        return tuple(
            F.grid_sample(
                image,
                F.affine_grid(matrix.to(image), list(image.shape), align_corners=False),
                padding_mode="border",
                align_corners=False,
            )
            for image, matrix in ((image_a, matrix_a), (image_b, matrix_b))
        )


class PairLoader:
    """Read a pair dictionary of a :class:`~monai_unireg.data.PairSampler` into network inputs.

    Each image is read with its own grid, brought to [0, 1] (CT window [-1000, 1000] or MRI [min, p99], the
    modality detected per image) and resized to ``size`` (trilinear, corner-aligned), as uniGradICON does:
    no physical-space alignment. Labels, when present, are resized by nearest neighbour.

    Returns a dictionary with ``moving``, ``fixed`` ``[1, *size]`` and, if available, ``moving_label``,
    ``fixed_label`` ``[1, *size]`` (int64).
    """

    def __init__(self, size: Sequence[int], ct_window: Sequence[float] = UNIGRADICON_CT_WINDOW) -> None:
        self.size = tuple(int(s) for s in size)
        self.ct_window = tuple(float(v) for v in ct_window)

    def __call__(self, pair: dict[str, Any]) -> dict[str, torch.Tensor]:
        item: dict[str, torch.Tensor] = {}
        for role in ("moving", "fixed"):
            image, _ = read_volume(pair[f"{role}_image"], f"{role}_image")
            image = normalise_intensity(image.float(), detect_modality(image), self.ct_window)
            item[role] = spatial.resize_image(image, self.size)[0]
            if pair.get(f"{role}_label"):
                label, _ = read_volume(pair[f"{role}_label"], f"{role}_label")
                item[f"{role}_label"] = spatial.resize_image(label.float(), self.size, mode="nearest")[0].long()
        return item


def stage_two_from_stage_one(stage_one: UniGradICON) -> UniGradICON:
    """A 4-step network whose first three UNets are copies of a trained 3-step one; the fourth is new (identity),
    as the reference's stage 2 (``net.regis_net.netPhi`` loaded from stage 1)."""
    if stage_one.include_step2:
        raise ValueError("stage_one must be a 3-step network (include_step2=False).")
    stage_two = UniGradICON(**{**stage_one.config, "include_step2": True}).to(next(stage_one.parameters()).device)
    for source, target in zip(stage_one.unets, stage_two.unets):
        target.load_state_dict(source.state_dict())
    return stage_two


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream) % (2**63)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _batches(items: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def validation_dice(
    network: nn.Module,
    pairs: Sequence[dict[str, Any]],
    loader: PairLoader,
    device: torch.device,
    labels: Sequence[int] | None = None,
) -> float:
    """Mean label Dice of ``network`` over ``pairs`` at the working size (labels warped without interpolation).

    Args:
        network: registration network (put in eval mode for the evaluation, restored afterwards).
        pairs: pair dictionaries with labels.
        loader: reads and resizes each pair.
        device: where to run the network.
        labels: label values to score (``None``: all non-zero labels of the fixed label map).
    """
    was_training = network.training
    network.eval()
    metric = LabelDiceMetric(labels=labels)
    scores = []
    with torch.no_grad():
        for pair in pairs:
            item = loader(pair)
            if "moving_label" not in item or "fixed_label" not in item:
                raise ValueError(f"validation pair {pair.get('fixed_image')} has no labels to compute Dice with.")
            ddf = network(item["moving"][None].to(device), item["fixed"][None].to(device)).cpu()
            warped = spatial.warp_labels(item["moving_label"][None], ddf)
            scores.append(float(metric(warped, item["fixed_label"][None]).nanmean()))
    network.train(was_training)
    return sum(scores) / len(scores)


def train_unigradicon(
    network: UniGradICON,
    sampler: PairSampler,
    output_dir: str | os.PathLike,
    epochs: int,
    batch_size: int = 1,
    learning_rate: float = 5e-5,
    objective: GradICONObjective | None = None,
    augmentation: RandomPairAugmentation | None = None,
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
    """Train (or fine-tune) ``network`` with the GradICON objective; one checkpoint per epoch.

    ``<output_dir>/checkpoint.pt`` holds ``{"config", "model", "optimizer", "sampler", "epoch", "history"}``
    after every epoch (written atomically); when it exists and ``resume`` is on, training continues from it
    exactly. ``<output_dir>/model.pt`` holds the network's configuration and weights alone (what inference and
    :func:`~monai_unireg.networks.nets.load_unigradicon` load).
    Fine-tuning is the same call on a network loaded from a checkpoint
    (:func:`~monai_unireg.networks.nets.load_unigradicon_weights`) with the new dataset's sampler.

    Args:
        network: the network to train (stage 1: ``include_step2=False``; stage 2: see
            :func:`stage_two_from_stage_one`).
        sampler: pairs per epoch (paper: 1000 per dataset).
        output_dir: checkpoint folder.
        epochs: total number of epochs (paper: 800 for stage 1, 200 for stage 2).
        batch_size: pairs per iteration (reference: 4 per GPU).
        learning_rate: Adam learning rate (paper: 5e-5).
        objective: the loss (default :class:`GradICONObjective` with the paper's settings).
        augmentation: pair augmentation (default :class:`RandomPairAugmentation`; ``None`` keeps the default,
            pass ``RandomPairAugmentation(0)`` for permutations and flips only).
        validation_pairs: labelled pairs scored (mean Dice) after every epoch.
        validation_labels: label values for that Dice (``None``: all non-zero labels).
        device: training device.
        amp: automatic mixed precision (CUDA only; ignored on the CPU).
        resume: continue from ``checkpoint.pt`` when present.
        seed: seed of the augmentation and GradICON jitter streams (the sampler has its own).
        max_iterations_per_epoch: cap on iterations per epoch (quick experiments and tests).
        distributed_model: the ``DistributedDataParallel`` wrapper of ``network`` when training with several
            processes: each rank takes every ``world_size``-th pair of the epoch (cut to a multiple of
            ``world_size``, so all take as many steps) with its own augmentation and jitter streams; rank 0
            validates, writes checkpoints and logs.
        log: progress output.

    Returns:
        the history: one dictionary per epoch (mean loss terms, validation Dice, seconds).
    """
    check_integer(epochs, "epochs", 1)
    check_integer(batch_size, "batch_size", 1)
    check_positive(learning_rate, "learning_rate")
    check_bool(amp, "amp")
    device = torch.device(device)
    output = Path(output_dir)
    rank, world = _rank_and_world()
    objective = objective or GradICONObjective()
    augmentation = augmentation or RandomPairAugmentation()
    model = distributed_model or network
    network.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = PairLoader(network.input_size)
    start_epoch, history = 0, []
    checkpoint_path = output / "checkpoint.pt"
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            log(f"resumed from {checkpoint_path} at epoch {start_epoch}")
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        pairs = sampler.pairs_for_epoch(epoch)
        shared = len(pairs) - len(pairs) % world  # every process takes as many steps (DDP waits for all)
        if shared == 0:
            raise ValueError(f"an epoch has {len(pairs)} pairs, fewer than the {world} processes.")
        batches = _batches(pairs[:shared][rank::world], batch_size)[: max_iterations_per_epoch or None]
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 2 * rank))
        objective.reseed(_epoch_seed(seed, epoch, 2 * rank + 1))
        network.train()
        totals: dict[str, float] = {}
        started = time.perf_counter()
        for iteration, batch in enumerate(batches, start=1):
            items = [loader(pair) for pair in batch]
            moving, fixed = (torch.stack([item[role] for item in items]).to(device) for role in ("moving", "fixed"))
            moving, fixed = augmentation(moving, fixed, generator)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                terms = objective(model, moving, fixed)
            if not torch.isfinite(terms.total):
                raise FloatingPointError(
                    f"the loss became {float(terms.total)} at epoch {epoch + 1}, iteration {iteration}."
                )
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            for name, value in terms.as_floats().items():
                totals[name] = totals.get(name, 0.0) + value
            if rank == 0:
                rate = iteration / (time.perf_counter() - started)
                log(
                    f"epoch {epoch + 1}/{epochs} iteration {iteration}/{len(batches)} "
                    + " ".join(f"{k} {v:.5f}" for k, v in terms.as_floats().items())
                    + f" ({rate:.2f} it/s)"
                )
        record = {name: value / len(batches) for name, value in totals.items()}
        record.update(epoch=epoch + 1, seconds=time.perf_counter() - started)
        if validation_pairs and rank == 0:
            record["validation_dice"] = validation_dice(network, validation_pairs, loader, device, validation_labels)
        history.append(record)
        if rank == 0:
            log(f"epoch {epoch + 1}/{epochs} done: " + ", ".join(f"{k} {v:.5f}" for k, v in record.items()))
            _save_checkpoint(output, network, optimizer, sampler, epoch + 1, history)
    return history


def _save_checkpoint(
    output: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: PairSampler,
    epoch: int,
    history: list[dict[str, float]],
) -> None:
    """Write ``checkpoint.pt`` and ``model.pt`` (``{"config", "model"}``, what inference loads) atomically; a crash
    leaves the previous ones intact."""
    output.mkdir(parents=True, exist_ok=True)
    state = {
        "config": network.config,
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    with io.atomic_path(output / "checkpoint.pt") as temporary:
        torch.save(state, temporary)
    with io.atomic_path(output / "model.pt") as temporary:
        torch.save({"config": network.config, "model": network.state_dict()}, temporary)


def instance_optimise(
    network: UniGradICON,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    iterations: int = 50,
    learning_rate: float = 2e-5,
    objective: GradICONObjective | None = None,
    log: Log | None = print,
) -> tuple[torch.Tensor, list[float]]:
    """Instance optimisation (IO): fine-tune all weights on one pair, return its field, restore the weights.

    Adam on every weight with the training objective, BatchNorm in eval mode (running statistics frozen), as the
    reference code; the network's weights and mode are restored afterwards, so IO never changes ``network``.

    Args:
        network: a trained network.
        moving: ``[1, 1, *S]`` moving image in [0, 1] (any size; resized to the working size).
        fixed: ``[1, 1, *S]`` fixed image on the same grid.
        iterations: optimisation steps (reference default: 50).
        learning_rate: Adam learning rate (reference: 2e-5).
        objective: the loss (default :class:`GradICONObjective`).
        log: progress output (``None``: silent).

    Returns:
        the ``[1, 3, *S]`` field after IO (voxels of the input grid), and the objective before each step and
        after the last one (``iterations + 1`` values).
    """
    check_integer(iterations, "iterations", 0)
    check_positive(learning_rate, "learning_rate")
    objective = objective or GradICONObjective()
    saved_state = copy.deepcopy(network.state_dict())
    was_training = network.training
    moving_w, fixed_w = network.to_working_size(moving), network.to_working_size(fixed)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    losses: list[float] = []
    try:
        network.eval()
        for step in range(iterations + 1):
            optimizer.zero_grad(set_to_none=True)
            terms = objective(network, moving_w, fixed_w)
            losses.append(float(terms.total.detach()))
            if log is not None and (step % 10 == 0 or step == iterations):
                log(
                    f"instance optimisation {step}/{iterations}: "
                    + " ".join(f"{k} {v:.5f}" for k, v in terms.as_floats().items())
                )
            if step == iterations:
                break
            terms.total.backward()
            optimizer.step()
        with torch.no_grad():
            ddf = network(moving, fixed)
    finally:
        network.load_state_dict(saved_state)
        network.train(was_training)
    if not all(math.isfinite(value) for value in losses):
        raise FloatingPointError(f"instance optimisation diverged: losses {losses}.")
    return ddf, losses


class InstanceOptimised(nn.Module):
    """A registration network whose ``forward`` runs :func:`instance_optimise` first (``iterations`` > 0).

    Lets any pipeline that calls ``network(moving, fixed) -> ddf`` (the command line, the bundles'
    :func:`~monai_unireg.engines.register_pairs`) use IO; the wrapped network's weights never change. IO needs
    gradients, so ``forward`` enables them even inside ``torch.no_grad()``.

    Args:
        network: a trained :class:`UniGradICON`.
        iterations: IO steps per pair (0: plain inference).
        learning_rate: Adam learning rate of IO (reference: 2e-5).
        log: progress output of IO (``None``: silent).
    """

    def __init__(
        self, network: UniGradICON, iterations: int = 50, learning_rate: float = 2e-5, log: Log | None = print
    ) -> None:
        super().__init__()
        self.network = network
        self.iterations = check_integer(iterations, "iterations", 0)
        self.learning_rate = float(check_positive(learning_rate, "learning_rate"))
        self.log = log

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``[B, 3, *S]`` field of each pair after IO (pairs optimised one at a time)."""
        if self.iterations == 0:
            return self.network(moving, fixed)
        with torch.enable_grad():
            fields = [
                instance_optimise(
                    self.network,
                    moving[b : b + 1],
                    fixed[b : b + 1],
                    self.iterations,
                    self.learning_rate,
                    log=self.log,
                )[0]
                for b in range(moving.shape[0])
            ]
        return torch.cat(fields).detach()
