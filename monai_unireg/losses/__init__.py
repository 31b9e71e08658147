"""Registration losses: MIND-SSC, LNCC, GradICON, the PromptReg prompt regularisers, forward-difference diffusion
and a soft label Dice.

MONAI's ``DiffusionLoss``, ``BendingEnergyLoss`` and ``DiceLoss`` are re-exported unchanged for convenience.
"""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "BendingEnergyLoss": "monai.losses",
    "DiceLoss": "monai.losses",
    "DiffusionLoss": "monai.losses",
    "GradICONLoss": ".gradicon",
    "LNCCLoss": ".lncc",
    "window_kernel": ".lncc",
    "MINDSSC": ".mind",
    "SSC_EDGES": ".mind",
    "MINDSSCLoss": ".mind",
    "PromptOrthogonalityLoss": ".prompt",
    "TaskSimilarityLoss": ".prompt",
    "diffusion_regularisation": ".regularisation",
    "diffusion_gradient": ".regularisation",
    "soft_dice_loss": ".regularisation",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("gradicon", "lncc", "mind", "prompt", "regularisation")

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
    "diffusion_gradient",
    "soft_dice_loss",
    "window_kernel",
]

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
