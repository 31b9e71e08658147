"""SACB-Net's defaults and training objective: the paper's unsupervised objective (Eq. 1), optionally with a Dice
term.

Cheng et al., "SACB-Net: Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025
(``shared/papers/sacbnet.txt``). Eq. 1: ``L = L_sim(I_m o (phi + Id), I_f) + lambda * L_reg(phi)`` with local NCC
(9^3 window, squared-correlation form) as ``L_sim`` and the L2 norm of the field's first differences as ``L_reg``;
Adam, learning rate 1e-4, batch 1 (paper Sec. 4), polynomial decay with power 0.9 and 300 epochs, lambda per task
(``shared/reference/METHODS.md``, from the reference code). Images are brought to [0, 1] (CT: HU window
[-1000, 1000], paper Sec. 4; MRI: [min, 99th percentile]) and resized to the network's working size; the training
is ``bundles/sacbnet/configs/train.yaml`` (MONAI's ``SupervisedTrainer`` with this objective).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.training import LossTerms
from monai_unireg.losses import LNCCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets.sacbnet import load_sacbnet
from monai_unireg.validation import check_integer, check_positive

__all__ = [
    "SACBNET_DEFAULTS",
    "SACBNET_CT_WINDOW",
    "SACBNET_LAMBDAS",
    "SACBNetObjective",
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
