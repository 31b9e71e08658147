"""uniGradICON training (two stages), fine-tuning and instance optimisation.

The objective is the paper's Eq. 1, ``L = LNCC(A o phi_AB, B) + LNCC(B o phi_BA, A) + lambda GradICON`` with
LNCC on a Gaussian window of sigma 5 voxels (the images warped with zero padding, as the authors' loss) and
``lambda = 1.5``, GradICON evaluated on the cascade's step functions composed at its sample points (as the reference
``icon_registration``; :meth:`~monai_unireg.networks.nets.UniGradICON.pop_steps`); Adam with learning rate 5e-5;
every epoch draws the same number of random pairs from each dataset (:class:`~monai_unireg.data.PairSampler`); images
are brought to [0, 1] (CT: HU window [-1000, 1000]; MRI: [min, 99th percentile]) and resized to the network's
working size, then augmented (:class:`RandomPairAugmentationd`: the published axis permutations, flips and affine
perturbations).

``bundles/unigradicon/configs/train.yaml`` wires these into MONAI's ``SupervisedTrainer``: the objective
(:class:`GradICONObjective`), the augmentation (:class:`RandomPairAugmentationd`), the weights training starts from
(:func:`check_starting_weights`, :class:`StartingWeights`: stage 2 from a stage-1 network, or fine-tuning).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from monai_unireg import spatial
from monai_unireg.engines.defaults import MethodDefaults
from monai_unireg.engines.training import Log, LossTerms
from monai_unireg.losses import GradICONLoss, LNCCLoss
from monai_unireg.networks.nets.unigradicon import UniGradICON, load_unigradicon, load_unigradicon_weights
from monai_unireg.validation import check_bool, check_integer, check_option, check_positive, plain_tensor

__all__ = [
    "UNIGRADICON_DEFAULTS",
    "GradICONObjective",
    "InstanceOptimised",
    "RandomPairAugmentationd",
    "StartingWeights",
    "check_starting_weights",
    "stage_two_from_stage_one",
    "instance_optimise",
    "UNIGRADICON_CT_WINDOW",
]

#: HU window of the paper's CT preprocessing (Sec. 2.1), mapped to [0, 1].
UNIGRADICON_CT_WINDOW = (-1000.0, 1000.0)

#: uniGradICON's defaults (one home for the command line, the bundle and the trainer).
UNIGRADICON_DEFAULTS = MethodDefaults(
    name="unigradicon",
    working_size=(175, 175, 175),
    size_multiple=1,
    ct_window=UNIGRADICON_CT_WINDOW,
    intensity_range=(0.0, 1.0),
    load_weights=load_unigradicon,
    io_iterations=50,
    io_learning_rate=2e-5,
    sources={
        "working_size": "paper Sec. 2.1",
        "ct_window": "paper Sec. 2.1",
        "io_iterations": "paper's (IO) rows, reference code: 50",
        "io_learning_rate": "reference code",
    },
)


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
        seed: seed of the GradICON jitter's private generator; ``None``: PyTorch's global generator on the fields'
            device (the bundle's: seeded by ``set_determinism`` and saved with its checkpoints).
    """

    def __init__(self, lam: float = 1.5, sigma: float = 5.0, squared: bool = False, seed: int | None = 0) -> None:
        super().__init__()
        self.lam = float(check_positive(lam, "lam", allow_zero=True))
        self.similarity = LNCCLoss(spatial_dims=3, kernel_type="gaussian", sigma=sigma, squared=squared)
        self.regulariser = GradICONLoss(seed=seed)

    def forward(
        self, network: nn.Module, batch: Mapping[str, torch.Tensor] | torch.Tensor, image_b: torch.Tensor | None = None
    ) -> LossTerms:
        """Evaluate the objective: ``objective(network, batch)`` (the convention of
        :class:`~monai_unireg.engines.bundle.RegistrationStep`; A is ``batch["moving"]``, B is ``batch["fixed"]``,
        other keys are ignored) or ``objective(network, image_a, image_b)``.

        Args:
            network: maps ``(moving, fixed)`` at its working size to a ``[B, 3, *S]`` voxel field.
            batch: ``{"moving", "fixed"}`` ``[B, 1, *S]`` images in [0, 1] on one grid, or image A itself.
            image_b: ``[B, 1, *S]`` image B when ``batch`` is image A; ``None`` with a batch dictionary.

        Returns:
            the total and its parts ``similarity`` (both LNCC terms) and ``gradicon`` (unweighted).
        """
        image_a, image_b = (batch["moving"], batch["fixed"]) if image_b is None else (batch, image_b)
        ddf_ab = network(image_a, image_b)
        steps_ab = _steps_of_last_call(network, ddf_ab)
        ddf_ba = network(image_b, image_a)
        steps_ba = _steps_of_last_call(network, ddf_ba)
        similarity = self.similarity(spatial.warp(image_a, ddf_ab, padding_mode="zeros"), image_b) + self.similarity(
            spatial.warp(image_b, ddf_ba, padding_mode="zeros"), image_a
        )
        gradicon = self.regulariser([f.float() for f in steps_ab], [f.float() for f in steps_ba])
        return LossTerms(similarity + self.lam * gradicon, similarity=similarity, gradicon=gradicon)


def _steps_of_last_call(network: Any, ddf: torch.Tensor) -> list[torch.Tensor]:
    """The step fields of a cascade's last call (:meth:`UniGradICON.pop_steps`), or ``[ddf]`` for a network that
    is one step (or holds no :class:`UniGradICON`). The cascade is found through the wrappers' ``module`` (a
    ``DistributedDataParallel``, the trainer's network that :class:`~monai_unireg.engines.bundle.RegistrationStep`
    calls) and ``network`` (:class:`~monai_unireg.networks.nets.PairInput`) attributes. Steps at another size than
    ``ddf`` (the network resized its input) are used as they are: GradICON is measured in normalised units."""
    module = network
    for _ in range(4):  # RegistrationStep's call -> DistributedDataParallel -> PairInput -> UniGradICON
        if isinstance(module, UniGradICON):
            break
        inner = getattr(module, "module", None)
        module = inner if inner is not None else getattr(module, "network", None)
    return module.pop_steps() if isinstance(module, UniGradICON) else [ddf]


def _augmentation_matrices(
    generator: torch.Generator, noise_std: float, permute_flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published augmentation's ``[1, 3, 4]`` affine matrices (``affine_grid`` convention) for image A and B:
    one random axis permutation with random flips for both (identity without ``permute_flip``), then each its own
    perturbation of the entries by N(0, ``noise_std``^2)."""
    base = torch.zeros(1, 3, 4)
    order = torch.randperm(3, generator=generator) if permute_flip else torch.arange(3)
    signs = torch.randint(0, 2, (3,), generator=generator) * 2 - 1 if permute_flip else torch.ones(3)
    base[0, torch.arange(3), order] = signs.float()
    noise_a = torch.randn(1, 3, 4, generator=generator) * noise_std
    noise_b = torch.randn(1, 3, 4, generator=generator) * noise_std
    return base + noise_a, base + noise_b


def stage_two_from_stage_one(stage_one: UniGradICON) -> UniGradICON:
    """A 4-step network whose first three UNets are copies of a trained 3-step one; the fourth is new (identity),
    as the reference's stage 2 (``net.regis_net.netPhi`` loaded from stage 1)."""
    if stage_one.include_step2:
        raise ValueError("stage_one must be a 3-step network (include_step2=False).")
    stage_two = UniGradICON(**{**stage_one.config, "include_step2": True}).to(next(stage_one.parameters()).device)
    for source, target in zip(stage_one.unets, stage_two.unets):
        target.load_state_dict(source.state_dict())
    return stage_two


class RandomPairAugmentationd(Randomizable, MapTransform):
    """The published augmentation as a MONAI random dictionary transform of one pair (no batch axis).

    ``keys`` are image A and image B, ``[C, *S]`` each on one grid (the pair at the network's working size): both
    get one random axis permutation with flips, then each its own small random affine (entries + N(0,
    ``noise_std``^2)), trilinear with border padding. The draws come from the transform's ``R``
    (``set_random_state``; a MONAI ``DataLoader`` seeds it, and
    :class:`~monai_unireg.engines.bundle.TransformRandomState` saves and restores it with a checkpoint).

    Args:
        keys: the two image keys, e.g. ``("moving_image", "fixed_image")``.
        noise_std: standard deviation of the affine perturbation (reference: 0.05).
        permute_flip: draw the axis permutation and flips (reference: on).
        prob: probability of augmenting a pair (reference: always, 1).
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        noise_std: float = 0.05,
        permute_flip: bool = True,
        prob: float = 1.0,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the pair's two images (A, B), got {self.keys!r}.")
        self.noise_std = float(check_positive(noise_std, "noise_std", allow_zero=True))
        self.permute_flip = check_bool(permute_flip, "permute_flip")
        self.prob = float(check_positive(prob, "prob", allow_zero=True))
        if self.prob > 1:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}.")
        self._seed: int | None = None

    def randomize(self, data: Any = None) -> None:
        """Draw whether to augment and the seed of this pair's permutation, flips and affine noise."""
        augment = self.R.rand() < self.prob
        self._seed = int(self.R.randint(np.iinfo(np.int32).max)) if augment else None

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        self.randomize()
        if self._seed is None:
            return d
        key_a, key_b = self.keys
        images = [plain_tensor(torch.as_tensor(d[key])).float()[None] for key in (key_a, key_b)]
        if images[0].shape != images[1].shape or images[0].ndim != 5:
            raise ValueError(
                f"{key_a} and {key_b} must be [C, D, H, W] images of one shape, got {tuple(images[0].shape[1:])} "
                f"and {tuple(images[1].shape[1:])}."
            )
        generator = torch.Generator().manual_seed(self._seed)
        matrices = _augmentation_matrices(generator, self.noise_std, self.permute_flip)
        for key, image, matrix in zip((key_a, key_b), images, matrices):
            grid = F.affine_grid(matrix.to(image), list(image.shape), align_corners=False)
            d[key] = F.grid_sample(image, grid, padding_mode="border", align_corners=False)[0]
        return d


def check_starting_weights(
    stage: int,
    stage1_weights: str | os.PathLike | None = None,
    init_weights: str | os.PathLike | None = None,
) -> None:
    """Check the settings of the weights training starts from (train.yaml's ``stage``, ``stage1_weights``,
    ``init_weights``; see :class:`StartingWeights`), before anything is built or written.

    Raises:
        ValueError: a stage other than 1 or 2, both files given, ``stage1_weights`` with stage 1, or stage 2
            without ``stage1_weights`` or ``init_weights``.
        FileNotFoundError: a given file that does not exist, naming its key.
    """
    check_option(stage, "stage", (1, 2))
    if stage1_weights is not None and init_weights is not None:
        raise ValueError(
            "give stage1_weights (stage 2 from a stage-1 network) or init_weights (fine-tuning), not both."
        )
    if stage == 1 and stage1_weights is not None:
        raise ValueError("stage1_weights initialises stage 2; with stage 1 leave it null (or use init_weights).")
    if stage == 2 and stage1_weights is None and init_weights is None:
        raise ValueError(
            "stage 2 needs stage1_weights: the model.pt written by stage 1 (e.g. --stage1_weights "
            "models/stage1/model.pt); to fine-tune a 4-UNet network instead, give init_weights."
        )
    for key, path in (("stage1_weights", stage1_weights), ("init_weights", init_weights)):
        if path is not None and not os.path.isfile(os.fspath(path)):
            raise FileNotFoundError(f"{key} names {os.fspath(path)!r}, which does not exist or is not a file.")


def _load(network: UniGradICON, path: str | os.PathLike, key: str) -> None:
    """:func:`~monai_unireg.networks.nets.load_unigradicon_weights` with the train.yaml settings to change."""
    try:
        load_unigradicon_weights(network, path)
    except ValueError as error:
        config = {name: network.config[name] for name in ("down_channels", "up_channels")}
        text = " ".join(line.strip() for line in str(error).splitlines()).rstrip(". ")
        raise ValueError(
            f"{key}: {text}; the network has {len(network.unets)} UNets and {config}: a 4-UNet file (e.g. the "
            "released Step_2_final.trch) needs --stage 2, and --down_channels / --up_channels must be the file's."
        ) from None


class StartingWeights:
    """Trainer handler: when training starts, fill the network with the weights it starts from.

    - stage 2 (a 4-UNet network) with ``stage1_weights``: its first three UNets from that stage-1 file, the fourth
      as built (identity), as the reference's stage 2 (:func:`stage_two_from_stage_one`);
    - ``init_weights`` (fine-tuning, either stage, paper Sec. 3.3): every weight from that file (a ``model.pt`` of
      train.yaml, a checkpoint of ours or the released ``Step_2_final.trch``, read by
      :func:`~monai_unireg.networks.nets.load_unigradicon_weights`, strictly). The weights do not depend on the
      working size, so a network is fine-tuned at any ``input_size``.

    Every process of a distributed run loads them (the ``DistributedDataParallel`` copy shares the parameters);
    when resuming, the checkpoint's network is used instead (disable this handler).

    Args:
        network: the :class:`UniGradICON` (or a :class:`~monai_unireg.networks.nets.PairInput` of one).
        stage1_weights: the stage-1 ``model.pt`` (stage 2).
        init_weights: any uniGradICON weights file (fine-tuning).
    """

    def __init__(
        self,
        network: nn.Module,
        stage1_weights: str | os.PathLike | None = None,
        init_weights: str | os.PathLike | None = None,
    ) -> None:
        network = getattr(network, "network", network)
        if not isinstance(network, UniGradICON):
            raise ValueError(f"network must be a UniGradICON (or a PairInput of one), got {type(network).__name__}.")
        check_starting_weights(2 if network.include_step2 else 1, stage1_weights, init_weights)
        self.network, self.stage1_weights, self.init_weights = network, stage1_weights, init_weights

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        if self.init_weights is not None:
            _load(self.network, self.init_weights, "init_weights")
        elif self.stage1_weights is not None:
            stage_one = UniGradICON(**{**self.network.config, "include_step2": False})
            _load(stage_one, self.stage1_weights, "stage1_weights")
            with torch.no_grad():
                for source, target in zip(stage_one.unets, self.network.unets):
                    target.load_state_dict(source.state_dict())


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
            terms = objective(network, {"moving": moving_w, "fixed": fixed_w})
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
