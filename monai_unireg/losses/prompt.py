"""PromptReg regularisers of the registration prompt generator: domain orthogonality and task similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_unireg.validation import check_bool, check_reduction, check_tensor

__all__ = ["PromptOrthogonalityLoss", "TaskSimilarityLoss"]


def _flatten_prompts(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check a stack of prompts ``[N, ...]`` (at least 2 dimensions, not empty) and return ``[N, prod(...)]``."""
    check_tensor(x, name)
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty stack of prompts [N, ...] (2 or more dimensions), got {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}.")
    return x.flatten(1).to(torch.promote_types(x.dtype, torch.float32))


class PromptOrthogonalityLoss(_Loss):
    r"""Domain orthogonality of a static knowledge base of prompts (Xie et al., "PromptReg", Eq. 1).

    With the ``Z`` prompts flattened to the rows of ``B`` ``[Z, N]``:

    .. math::

        L_{ort}(B) = \lVert B B^T - \operatorname{diag}(B B^T) \rVert_F,

    the Frobenius norm (the L2 norm of the entries) of the off-diagonal part of the Gram matrix, 0 exactly
    when the prompts are mutually orthogonal. By default the rows are used as they are, the paper's equation.
    ``normalize=True`` first scales each row to unit L2 norm, so the loss penalises the cosines between
    prompts only and cannot be lowered by shrinking them; this is what the authors' public code computes.

    Args:
        normalize: L2-normalise each prompt before forming the Gram matrix.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = check_bool(normalize, "normalize")

    def forward(self, knowledge_base: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            knowledge_base: ``[Z, ...]`` prompts (e.g. ``[Z, C, D, H, W]``), each flattened to one row.

        Returns:
            scalar loss, float32 at least (float64 stays float64).
        """
        prompts = _flatten_prompts(knowledge_base, "knowledge_base")
        if self.normalize:
            prompts = F.normalize(prompts, dim=1)
        gram = prompts @ prompts.t()
        return torch.linalg.matrix_norm(gram - torch.diag_embed(torch.diagonal(gram)))


class TaskSimilarityLoss(_Loss):
    r"""Task similarity between the weighted prompt and the prompt of the sample's task (PromptReg, Eq. 5).

    .. math::

        L_{ts} = \left(1 - \frac{\langle p_w, b_t \rangle}{\lVert p_w \rVert\,\lVert b_t \rVert}\right)^2

    per sample, with ``p_w`` and ``b_t`` flattened; 0 when ``p_w`` points along ``b_t``, at most 4. The task
    prompt of each sample is picked by the caller from the knowledge base, e.g.
    ``loss(p_w, knowledge_base[task_index])`` with ``task_index`` a ``[B]`` integer tensor.

    Args:
        reduction: ``"mean"`` (over the batch, as the reference code), ``"sum"`` or ``"none"`` (``[B]``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))

    def forward(self, weighted_prompt: torch.Tensor, task_prompt: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            weighted_prompt: ``[B, ...]`` weighted prompt ``p_w`` of each sample.
            task_prompt: ``[B, ...]`` knowledge-base prompt of each sample's task, same shape.

        Returns:
            the reduced loss, or ``[B]`` for ``reduction="none"``; float32 at least.
        """
        p_w = _flatten_prompts(weighted_prompt, "weighted_prompt")
        b_t = _flatten_prompts(task_prompt, "task_prompt")
        if weighted_prompt.shape != task_prompt.shape:
            raise ValueError(
                f"weighted_prompt and task_prompt must have the same shape, got {tuple(weighted_prompt.shape)} "
                f"and {tuple(task_prompt.shape)}."
            )
        per_sample = (1.0 - F.cosine_similarity(p_w, b_t, dim=1)) ** 2
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample
