"""Registration losses: MIND-SSC, LNCC, GradICON and the PromptReg prompt regularisers.

MONAI's ``DiffusionLoss``, ``BendingEnergyLoss`` and ``DiceLoss`` are re-exported unchanged for convenience.
"""

from monai.losses import BendingEnergyLoss, DiceLoss, DiffusionLoss

from .gradicon import GradICONLoss
from .lncc import LNCCLoss, window_kernel
from .mind import MINDSSC, SSC_EDGES, MINDSSCLoss
from .prompt import PromptOrthogonalityLoss, TaskSimilarityLoss

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
    "window_kernel",
]
