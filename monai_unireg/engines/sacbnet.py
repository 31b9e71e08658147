"""SACB-Net training: the paper's unsupervised objective (Eq. 1), optionally with a Dice term, and its schedule.

Cheng et al., "SACB-Net: Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025
(``shared/papers/sacbnet.txt``). Eq. 1: ``L = L_sim(I_m o (phi + Id), I_f) + lambda * L_reg(phi)`` with local NCC
(9^3 window, squared-correlation form) as ``L_sim`` and the L2 norm of the field's first differences as ``L_reg``;
Adam, learning rate 1e-4, batch 1 (paper Sec. 4), polynomial decay with power 0.9 and 300 epochs, lambda per task
(``shared/reference/METHODS.md``, from the reference code). Images are brought to [0, 1] (CT: HU window
[-1000, 1000], paper Sec. 4; MRI: [min, 99th percentile]) and resized to the network's working size; the loop is
:func:`~monai_unireg.engines.train_registration`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.training import (
    Augmentation,
    Log,
    LossTerms,
    PairLoader,
    polynomial_decay,
    train_registration,
)
from monai_unireg.losses import LNCCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets.sacbnet import load_sacbnet
from monai_unireg.validation import check_integer, check_positive

__all__ = [
    "SACBNET_DEFAULTS",
    "SACBNET_CT_WINDOW",
    "SACBNET_LAMBDAS",
    "SACBNetObjective",
    "train_sacbnet",
]

#: Diffusion weight lambda of Eq. 1 per task (METHODS.md, read from the reference code's comments): brain
#: atlas-to-subject (IXI) about 3, brain inter-subject (LPBA) about 1, abdomen CT 0.3-0.5 (0.3: the value the
#: reference code uses).
SACBNET_LAMBDAS = {"ixi": 3.0, "lpba": 1.0, "abdomen_ct": 0.3}

#: HU window of the paper's abdomen CT preprocessing (Sec. 4), mapped to [0, 1].
SACBNET_CT_WINDOW = (-1000.0, 1000.0)

#: SACB-Net's defaults (one home for the command line, the bundle and the trainer).
SACBNET_DEFAULTS = MethodDefaults(
    name="sacbnet",
    working_size=(160, 192, 224),
    size_multiple=16,
    ct_window=SACBNET_CT_WINDOW,
    intensity_range=(0.0, 1.0),
    load_weights=load_sacbnet,
    sources={
        "working_size": "paper Sec. 4 (IXI; LPBA 160x192x160, abdomen CT 192x160x224)",
        "ct_window": "paper Sec. 4",
        "lambdas": "METHODS.md/reference code (SACBNET_LAMBDAS)",
    },
)


class SACBNetObjective(nn.Module):
    r"""SACB-Net's training loss (paper Eq. 1), optionally with a Dice term on labelled pairs.

    .. math::

        L = \big(1 - \operatorname{mean}_x \mathrm{lncc}^2(I_m \circ \phi, I_f)\big)
            + \lambda L_{reg}(u) + w_{Dice} \big(1 - \mathrm{Dice}(S_m \circ \phi, S_f)\big),

    with ``u = network(moving, fixed)`` the displacement in voxels and ``I_m o phi = warp(moving, u)``.

    - Similarity: :class:`~monai_unireg.losses.LNCCLoss` on a ``window^3`` box window (9: the reference code's
      VoxelMorph NCC) in the squared-correlation form. The reference returns ``-mean(cc)`` with ``cc = cov^2 /
      (var_m var_f + 1e-5)`` on window sums; ``1 - mean(lncc^2)`` is that shifted by 1 (0 for identical images with
      no flat window), with ``eps = 1e-5`` added to each windowed variance instead (same gradient up to the
      epsilon). The moving image is warped with border padding (the MONAI ``Warp`` convention).
    - Regulariser: :func:`diffusion_regularisation` (forward differences, the reference code's normalisation).
    - Dice: :func:`soft_dice_loss` of the moving labels warped as one-hot maps (trilinear, so differentiable),
      used only when ``dice_weight > 0`` and the batch holds ``moving_label`` and ``fixed_label``.

    Args:
        lam: weight lambda of the regulariser (see :data:`SACBNET_LAMBDAS`: IXI 3, LPBA 1, abdomen CT 0.3).
        dice_weight: weight of the Dice term (0: unsupervised, as the paper).
        window: side of the LNCC box window (paper / reference: 9).
        dice_labels: label values of the Dice term (``None``: every non-zero label of the pair).
    """

    def __init__(
        self, lam: float = 1.0, dice_weight: float = 0.0, window: int = 9, dice_labels: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.lam = float(check_positive(lam, "lam", allow_zero=True))
        self.dice_weight = float(check_positive(dice_weight, "dice_weight", allow_zero=True))
        if check_integer(window, "window", 1) % 2 == 0:
            raise ValueError(f"window must be an odd number of voxels (a centred box), got {window}.")
        self.similarity = LNCCLoss(spatial_dims=3, kernel_type="box", kernel_size=window, squared=True)
        self.dice_labels = None if dice_labels is None else tuple(check_integer(v, "dice_labels") for v in dice_labels)

    def forward(self, network: nn.Module, batch: Mapping[str, torch.Tensor]) -> LossTerms:
        """Evaluate the objective on a batch.

        Args:
            network: ``network(moving, fixed) -> ddf`` ``[B, 3, *S]`` in voxels.
            batch: ``{"moving", "fixed"}`` ``[B, 1, *S]`` images in [0, 1] on one grid, and optionally
                ``{"moving_label", "fixed_label"}`` ``[B, 1, *S]`` integer label maps.

        Returns:
            the total and its unweighted parts ``similarity``, ``diffusion`` and, when the Dice term is used,
            ``dice``.
        """
        moving, fixed = batch["moving"], batch["fixed"]
        ddf = network(moving, fixed)
        similarity = self.similarity(spatial.warp(moving, ddf), fixed)
        diffusion = diffusion_regularisation(ddf)
        total = similarity + self.lam * diffusion
        parts = {"similarity": similarity, "diffusion": diffusion}
        if self.dice_weight > 0 and "moving_label" in batch and "fixed_label" in batch:
            dice = soft_dice_loss(batch["moving_label"], batch["fixed_label"], ddf, self.dice_labels)
            total = total + self.dice_weight * dice
            parts["dice"] = dice
        return LossTerms(total, **parts)


def train_sacbnet(
    network: nn.Module,
    sampler: PairSampler,
    output_dir: str | os.PathLike,
    epochs: int,
    lam: float = 1.0,
    dice_weight: float = 0.0,
    learning_rate: float = 1e-4,
    power: float = 0.9,
    batch_size: int = 1,
    dice_labels: Sequence[int] | None = None,
    lncc_window: int = 9,
    augmentation: Augmentation | None = None,
    ct_window: Sequence[float] = SACBNET_CT_WINDOW,
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
    """Train (or fine-tune) a SACB-Net with :class:`SACBNetObjective`; one checkpoint per epoch.

    :func:`~monai_unireg.engines.train_registration` with Adam (``learning_rate``, paper: 1e-4) and the polynomial
    decay ``lr = lr0 * (1 - it / total) ** power`` stepped every iteration (``total = epochs * iterations per
    epoch``, :func:`~monai_unireg.engines.polynomial_decay`); the pairs are read by
    :class:`~monai_unireg.engines.PairLoader` at ``network.input_size`` (images in [0, 1], trilinear; labels
    nearest). ``<output_dir>/checkpoint.pt`` (model, optimiser, scheduler, sampler, epoch, history) and ``model.pt``
    (``{"config", "model"}``) are written atomically after every epoch; with ``resume`` training continues from
    ``checkpoint.pt`` exactly.

    Args:
        network: a registration network ``network(moving, fixed) -> ddf`` with ``input_size`` (its working size)
            and ``config`` (its constructor arguments), e.g. :class:`~monai_unireg.networks.nets.sacbnet.SACBNet`.
        sampler: pairs per epoch.
        output_dir: checkpoint folder.
        epochs: total number of epochs, resumed ones included (paper: 300).
        lam: regulariser weight (:data:`SACBNET_LAMBDAS`).
        dice_weight: weight of the Dice term on labelled pairs (0: unsupervised, as the paper).
        learning_rate: initial Adam learning rate (paper Sec. 4: 1e-4).
        power: exponent of the polynomial decay (reference code: 0.9).
        batch_size: pairs per iteration and process (paper: 1).
        dice_labels: label values of the Dice term (``None``: every non-zero label of the pair).
        lncc_window: side of the LNCC box window (reference code: 9).
        augmentation: ``augmentation(batch, generator) -> batch`` (paper: none).
        ct_window: HU window of CT images (paper: [-1000, 1000]).
        validation_pairs: labelled pairs scored (mean Dice at the working size) after every epoch.
        validation_labels: label values for that Dice (``None``: all non-zero labels).
        device: training device.
        amp: automatic mixed precision (CUDA only).
        resume: continue from ``checkpoint.pt`` when present.
        seed: seed of the augmentation stream (the sampler has its own).
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed_model: the ``DistributedDataParallel`` wrapper of ``network`` (see
            :func:`~monai_unireg.engines.train_registration`).
        log: progress output.

    Returns:
        the history: one dictionary per epoch (mean ``loss``, ``similarity``, ``diffusion``, ``dice`` when used,
        ``learning_rate`` after the epoch, ``validation_dice`` with validation pairs, ``seconds``, ``epoch``).
    """
    check_positive(power, "power")
    input_size = getattr(network, "input_size", None)
    if input_size is None:
        raise ValueError(f"network ({type(network).__name__}) must have an 'input_size' (its working size).")
    return train_registration(
        network,
        SACBNetObjective(lam=lam, dice_weight=dice_weight, window=lncc_window, dice_labels=dice_labels),
        sampler,
        PairLoader(input_size, ct_window),
        output_dir,
        epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        scheduler_factory=functools.partial(polynomial_decay, power=power),
        augmentation=augmentation,
        validation_pairs=validation_pairs,
        validation_labels=validation_labels,
        device=device,
        amp=amp,
        resume=resume,
        seed=seed,
        max_iterations_per_epoch=max_iterations_per_epoch,
        distributed_model=distributed_model,
        log=log,
    )
