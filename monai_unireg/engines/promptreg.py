"""PromptReg training: the paper's objective (Eq. 6) over several datasets, each a domain of the knowledge base.

Xie et al., "PromptReg", MICCAI 2025 (``shared/papers/promptreg.txt``, Sec. 2.4 and 3.1):
``L = L_sim + 0.1 L_smooth + 0.001 L_ort + 0.001 L_ts`` with MIND-SSC similarity (radius 2, dilation 2), the
VoxelMorph smoothness (mean squared forward differences), the knowledge base's orthogonality (Eq. 1) and the task
similarity between the weighted prompt and the prompt of the pair's own dataset (Eq. 5); Adam (with AMSGrad, as the
authors' code: :data:`PROMPTREG_OPTIMIZER`; the paper says only "Adam"), learning rate
1e-4 with polynomial decay (power 0.9) per iteration, batch 1, 100 random pairs per dataset per epoch, 300 epochs,
images in [0, 1] (CT: HU [-1000, 1000]; MRI: [min, 99th percentile]) resized to 160^3. Leaving one dataset out of
training (and validating on it) gives the paper's zero-shot setting (Table 1). The loop is
:func:`~monai_unireg.engines.train_registration`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.training import (
    CT_WINDOW,
    Augmentation,
    Batch,
    Log,
    LossTerms,
    PairLoader,
    polynomial_decay,
    train_registration,
)
from monai_unireg.losses import MINDSSCLoss, PromptOrthogonalityLoss, TaskSimilarityLoss, diffusion_regularisation
from monai_unireg.networks.nets.promptreg import PromptReg, load_promptreg
from monai_unireg.validation import check_bool, check_positive

__all__ = ["PROMPTREG_DEFAULTS", "DomainPairLoader", "PromptRegObjective", "train_promptreg"]

#: PromptReg's defaults (one home for the command line, the bundle and the trainer).
PROMPTREG_DEFAULTS = MethodDefaults(
    name="promptreg",
    working_size=(160, 160, 160),
    size_multiple=8,
    ct_window=(-1000.0, 1000.0),
    intensity_range=(0.0, 1.0),
    load_weights=load_promptreg,
    sources={"working_size": "paper Sec. 3.1", "ct_window": "paper Sec. 3.1"},
)


#: The optimiser of the authors' training script: ``torch.optim.Adam(..., amsgrad=True)`` (the paper names Adam).
PROMPTREG_OPTIMIZER = functools.partial(torch.optim.Adam, amsgrad=True)


class DomainPairLoader(PairLoader):
    """:class:`~monai_unireg.engines.PairLoader` that also returns the pair's ``"domain"`` (int64 scalar) when it has
    one: the index of its dataset in the :class:`~monai_unireg.data.PairSampler`, i.e. of its prompt in the
    knowledge base. Validation pairs (read by the same loader) need none; a training batch without it is refused
    by :class:`PromptRegObjective`."""

    def __call__(self, pair: dict[str, Any]) -> Batch:
        item = super().__call__(pair)
        if "domain" in pair:
            item["domain"] = torch.tensor(int(pair["domain"]))
        return item


class PromptRegObjective(nn.Module):
    r"""PromptReg's training loss (paper Eq. 6).

    .. math::

        L = \mathrm{MIND}(I_m \circ \phi, I_f) + \lambda_1 L_{smooth}(u) + \lambda_2 L_{ort}(B)
            + \lambda_3 L_{ts}(p_w, b_{domain})

    with ``u = network(moving, fixed)`` in voxels, :class:`~monai_unireg.losses.MINDSSCLoss` (radius 2, dilation 2),
    :func:`~monai_unireg.losses.diffusion_regularisation`, :class:`~monai_unireg.losses.PromptOrthogonalityLoss`
    on the knowledge base ``B`` (Eq. 1 as written; ``normalize_orthogonality`` gives the authors' code's version on
    unit prompts) and :class:`~monai_unireg.losses.TaskSimilarityLoss` between the weighted prompt and the prompt of
    each pair's domain (the batch's ``"domain"``). Without the prompt generator (the "w/o RPG" ablation) the last
    two terms are absent.

    Args:
        smoothness: ``lambda_1`` (paper: 0.1).
        orthogonality: ``lambda_2`` (paper: 0.001).
        task_similarity: ``lambda_3`` (paper: 0.001).
        normalize_orthogonality: L2-normalise the prompts in ``L_ort``.
    """

    def __init__(
        self,
        smoothness: float = 0.1,
        orthogonality: float = 1e-3,
        task_similarity: float = 1e-3,
        normalize_orthogonality: bool = False,
    ) -> None:
        super().__init__()
        self.smoothness = float(check_positive(smoothness, "smoothness", allow_zero=True))
        self.orthogonality = float(check_positive(orthogonality, "orthogonality", allow_zero=True))
        self.task_similarity = float(check_positive(task_similarity, "task_similarity", allow_zero=True))
        self.mind = MINDSSCLoss(radius=2, dilation=2)
        self.orthogonality_loss = PromptOrthogonalityLoss(
            check_bool(normalize_orthogonality, "normalize_orthogonality")
        )
        self.task_similarity_loss = TaskSimilarityLoss()

    def forward(self, model: nn.Module, batch: Batch) -> LossTerms:
        """Loss of ``model`` (a :class:`PromptReg`, or its ``DistributedDataParallel`` wrapper) on ``batch``."""
        network = getattr(model, "module", model)
        moving, fixed = batch["moving"], batch["fixed"]
        ddf = model(moving, fixed)
        similarity = self.mind(spatial.warp(moving, ddf), fixed)
        diffusion = diffusion_regularisation(ddf)
        total = similarity + self.smoothness * diffusion
        parts = {"similarity": similarity, "diffusion": diffusion}
        if getattr(network, "use_prompt", False):
            if "domain" not in batch:
                raise ValueError("the batch has no 'domain': the task-similarity loss needs each pair's dataset index.")
            prompt = network.pop_prompt()
            domains = batch["domain"].long().view(-1)
            if int(domains.max()) >= prompt.knowledge_base.shape[0] or int(domains.min()) < 0:
                raise ValueError(
                    f"domain ids {domains.tolist()} outside the knowledge base's {prompt.knowledge_base.shape[0]} "
                    "prompts: num_domains must equal the number of training datasets."
                )
            parts["orthogonality"] = self.orthogonality_loss(prompt.knowledge_base)
            parts["task_similarity"] = self.task_similarity_loss(prompt.weighted_prompt, prompt.knowledge_base[domains])
            total = (
                total + self.orthogonality * parts["orthogonality"] + self.task_similarity * parts["task_similarity"]
            )
        return LossTerms(total, **parts)


def train_promptreg(
    network: PromptReg,
    sampler: PairSampler,
    output_dir: str | os.PathLike,
    epochs: int,
    smoothness: float = 0.1,
    orthogonality: float = 1e-3,
    task_similarity: float = 1e-3,
    learning_rate: float = 1e-4,
    power: float = 0.9,
    batch_size: int = 1,
    normalize_orthogonality: bool = False,
    augmentation: Augmentation | None = None,
    ct_window: Sequence[float] = CT_WINDOW,
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
    """Train (or fine-tune) PromptReg with :class:`PromptRegObjective` over the datasets of ``sampler``.

    Each dataset of the sampler is one domain, its index the prompt the task-similarity loss pulls towards, so the
    network's ``num_domains`` must equal the number of datasets. :func:`~monai_unireg.engines.train_registration`
    with Adam and the per-iteration polynomial decay, pairs read by :class:`DomainPairLoader` at
    ``network.input_size``; ``checkpoint.pt`` and ``model.pt`` after every epoch, exact resume. For the zero-shot
    setting give the held-out dataset's pairs as ``validation_pairs`` (its Dice is then a zero-shot score).

    Args:
        network: the network (``use_prompt=False`` trains the backbone alone: the "w/o RPG" ablation).
        sampler: pairs per epoch (paper: 100 per dataset).
        output_dir: checkpoint folder.
        epochs: total epochs, resumed ones included (paper: 300).
        smoothness: ``lambda_1`` (0.1).
        orthogonality: ``lambda_2`` (0.001).
        task_similarity: ``lambda_3`` (0.001).
        learning_rate: initial Adam learning rate (1e-4).
        power: polynomial decay exponent (0.9).
        batch_size: pairs per iteration and process (1).
        normalize_orthogonality: see :class:`PromptRegObjective`.
        augmentation: ``augmentation(batch, generator) -> batch`` (paper: none).
        ct_window: HU window of CT images ([-1000, 1000]).
        validation_pairs: labelled pairs scored (mean Dice at the working size) after every epoch.
        validation_labels: label values of that Dice (``None``: all non-zero labels).
        device: training device.
        amp: automatic mixed precision (CUDA only).
        resume: continue from ``checkpoint.pt`` when present.
        seed: seed of the augmentation stream.
        max_iterations_per_epoch: cap on iterations per epoch (quick runs, tests).
        distributed_model: the ``DistributedDataParallel`` wrapper of ``network``.
        log: progress output.

    Returns:
        the history: one dictionary per epoch (mean loss and its parts, learning rate, validation Dice, seconds).
    """
    check_positive(power, "power")
    if network.use_prompt and network.config["num_domains"] != len(sampler.domains):
        raise ValueError(
            f"the network's knowledge base has num_domains={network.config['num_domains']} prompts but the sampler "
            f"draws from {len(sampler.domains)} datasets {list(sampler.domains)}; build PromptReg with "
            f"num_domains={len(sampler.domains)}."
        )
    return train_registration(
        network,
        PromptRegObjective(smoothness, orthogonality, task_similarity, normalize_orthogonality),
        sampler,
        DomainPairLoader(network.input_size, ct_window),
        output_dir,
        epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer_factory=PROMPTREG_OPTIMIZER,
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
