"""What a learned method's training objective returns, and the types the engines share.

An objective is ``objective(network, batch) -> LossTerms``: the scalar that is minimised and its named parts.
The bundles' ``train.yaml`` hand it to :class:`~monai_unireg.engines.bundle.RegistrationStep`, the iteration of
MONAI's ``SupervisedTrainer``, whose output is ``{"loss": total, **parts}``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Batch", "Log", "LossTerms"]

#: A progress callback (a message a line).
Log = Callable[[str], None]
#: A batch of pairs: ``"moving"``, ``"fixed"`` ``[B, C, *S]`` and optional labels and conditions.
Batch = dict[str, torch.Tensor]


class LossTerms:
    """An objective's value: ``total`` (the scalar that is minimised) and its named parts (scalars with gradients).

    Parts are read as attributes (``terms.similarity``) or from :attr:`parts`; :meth:`as_floats` gives their values
    for logs (instance optimisation's progress lines), ``total`` under the name ``"loss"``.

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
        """``{"loss": total, **parts}`` as Python floats (for logs)."""
        return {"loss": float(self.total.detach()), **{k: float(v.detach()) for k, v in self.parts.items()}}
