"""Registration losses: MIND-SSC, LNCC, GradICON, the PromptReg prompt regularisers, forward-difference diffusion
and a soft label Dice.

MONAI's ``DiffusionLoss``, ``BendingEnergyLoss`` and ``DiceLoss`` are re-exported unchanged for convenience.
"""

from monai.losses import BendingEnergyLoss, DiceLoss, DiffusionLoss

from .gradicon import GradICONLoss
from .lncc import LNCCLoss, window_kernel
from .mind import MINDSSC, SSC_EDGES, MINDSSCLoss
from .prompt import PromptOrthogonalityLoss, TaskSimilarityLoss
from .regularisation import diffusion_regularisation, soft_dice_loss

__all__ = [
    "BendingEnergyLoss",
    "DiceLoss",
    "DiffusionLoss",
    "GradICONLoss",
    "LNCCLoss",
    "MINDSSC",
    "MINDSSCLoss",
    "PromptOrthogonalityLoss",
    "SSC_EDGES",
    "TaskSimilarityLoss",
    "diffusion_regularisation",
    "soft_dice_loss",
    "window_kernel",
]
