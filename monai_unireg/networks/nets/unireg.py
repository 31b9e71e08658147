"""UniReg: a shared encoder-decoder backbone whose deformation head is generated from a conditional control vector.

Li et al., "UniReg: Foundation Model for Controllable Medical Image Registration" (``shared/papers/unireg.txt``):
the backbone (Sec. 3.1.1) turns the pair into per-voxel features ``E``; the control vector (Sec. 3.1.2, Eq. 3-5)
``c = [T, e, pool(E)]`` joins the task one-hot ``T`` (body region), the registration type ``e`` (inter-subject
``[0, 1]``, intra-subject ``[1, 0]``) and the instance features (global average of ``E``); the controller
generates the 171 parameters of the dynamic head ``8 -> 8 -> 8 -> 3`` (Sec. 3.1.3) that maps ``E`` to the field.

The paper's backbone starts from self-supervised anatomical embeddings (SAM) that are not available here: any
feature extractor can be plugged in (``feature_extractor``: an ``nn.Module`` ``[B, 1, *S] -> [B, C_f, *S']``, its
features resized to the image grid and concatenated with the images, as the paper does with SAM's), MIND-SSC is
built in (``"mind"``, the paper's suggestion for MR), and without one the backbone works from the images alone.
The paper's backbone also reads a 27-channel correlation of the two images' (SAM) features at 1/2 resolution
(supplementary Table 7); :func:`feature_correlation` computes it on whatever features there are (the extracted
ones, or the images themselves) and the backbone joins it at its 1/2 level (``correlation=True``, the default).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.io import load_network
from monai_unireg.losses.mind import MINDSSC
from monai_unireg.networks.blocks.cost_volume import NEIGHBOUR_OFFSETS, neighbour_cost_volume
from monai_unireg.networks.blocks.dynamic_head import UNIREG_HEAD_CHANNELS, DynamicDeformationHead
from monai_unireg.spatial import resize_image
from monai_unireg.validation import check_bool, check_image_pair, check_integer, check_option

__all__ = [
    "DEFAULT_TASKS",
    "DEFAULT_TASK_ALIASES",
    "REGISTRATION_TYPES",
    "ConditionedUniReg",
    "UniReg",
    "UniRegBackbone",
    "feature_correlation",
    "load_unireg",
]

#: Body regions of the task one-hot ``T`` (Eq. 3): the paper's four training tasks and the shared data's regions.
DEFAULT_TASKS = ("head_neck", "chest", "abdomen", "liver", "brain", "pelvis")
#: Unseen anatomy -> the nearest trained region (Sec. 3.3: the paper registers lung tumours as "chest").
DEFAULT_TASK_ALIASES = {
    "lung": "chest",
    "heart": "chest",
    "head": "head_neck",
    "neck": "head_neck",
    "kidney": "abdomen",
    "pancreas": "abdomen",
    "spleen": "abdomen",
    "prostate": "pelvis",
    "bladder": "pelvis",
}
#: Registration types, in the order of their index (0: inter-subject, ``e = [0, 1]``; 1: intra-subject, ``[1, 0]``).
REGISTRATION_TYPES = ("inter", "intra")
#: Encoder channels at 1, 1/2, 1/4 and 1/8 of the input size.
UNIREG_CHANNELS = (16, 32, 32, 32)

Condition = str | Sequence[str] | torch.Tensor


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution followed by LeakyReLU(0.2) (paper Fig. 4: every convolution is followed by LeakyReLU)."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class _ResidualBlock(nn.Module):
    """``x + act(conv(act(conv(x))))``: two convolutions, each followed by LeakyReLU(0.2) (Sec. 3.1.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def feature_correlation(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """The 27-channel correlation layer of UniReg's backbone (supplementary Table 7), at 1/2 resolution.

    Both feature maps are average-pooled x2 and standardised per sample and channel (zero mean, unit variance over
    the volume, so images and embeddings of any scale compare alike); channel ``k`` is then
    ``mean_c f_c(x) m_c(x + o_k)`` for the 27 offsets ``o_k`` of
    :data:`~monai_unireg.networks.blocks.NEIGHBOUR_OFFSETS` (zero outside the volume), the shared cost-volume block.

    Args:
        fixed: ``[B, C, D, H, W]`` features of the fixed image (sizes even).
        moving: ``[B, C, D, H, W]`` features of the moving image.

    Returns:
        ``[B, 27, D/2, H/2, W/2]`` correlations.
    """
    pooled = [F.avg_pool3d(x, 2) for x in (fixed, moving)]
    standardised = [
        (x - x.mean(dim=(2, 3, 4), keepdim=True)) / (x.std(dim=(2, 3, 4), keepdim=True) + 1e-5) for x in pooled
    ]
    return neighbour_cost_volume(*standardised, metric="dot") / fixed.shape[1]


class UniRegBackbone(nn.Module):
    """The shared encoder-decoder (Sec. 3.1.1): ``[B, C_in, *S] -> E`` ``[B, feature_channels, *S]``.

    Encoder: a convolution and a residual block at full resolution, then per level a stride-2 convolution and a
    residual block (``channels`` at 1, 1/2, 1/4, 1/8). Decoder: from the coarsest level, trilinear x2 upsampling,
    concatenation with the encoder features of that level and a convolution; two more convolutions at full
    resolution give ``E``. With ``correlation_channels``, a correlation map at 1/2 resolution
    (:func:`feature_correlation`) is joined to the encoder's 1/2-level features by one more convolution. Spatial
    sizes must be divisible by ``2 ** (len(channels) - 1)``. Convolutions start
    Kaiming-normal for LeakyReLU(0.2) with zero biases, so ``E`` is of order 1 (PyTorch's default initialisation
    shrinks the activations about 100-fold through the 15 layers, and the head's field with them).

    Args:
        in_channels: input channels (2 for a pair of single-channel images, more with extracted features).
        channels: encoder channels per level (default ``(16, 32, 32, 32)``).
        feature_channels: channels of ``E`` (the head's input: 8).
        correlation_channels: channels of the correlation map joined at 1/2 resolution (27; 0: none).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = UNIREG_CHANNELS,
        feature_channels: int = 8,
        correlation_channels: int = 0,
    ) -> None:
        super().__init__()
        self.channels = tuple(check_integer(c, "channels", 1) for c in channels)
        if len(self.channels) < 2:
            raise ValueError(f"channels must list at least 2 levels, got {tuple(channels)!r}.")
        check_integer(in_channels, "in_channels", 1)
        check_integer(feature_channels, "feature_channels", 1)
        self.encoder = nn.ModuleList(
            [nn.Sequential(_conv(in_channels, self.channels[0]), _ResidualBlock(self.channels[0]))]
        )
        for c_in, c_out in zip(self.channels[:-1], self.channels[1:]):
            self.encoder.append(nn.Sequential(_conv(c_in, c_out, stride=2), _ResidualBlock(c_out)))
        self.correlation_channels = check_integer(correlation_channels, "correlation_channels", 0)
        self.correlation_fusion = (
            _conv(self.channels[1] + self.correlation_channels, self.channels[1]) if self.correlation_channels else None
        )
        self.decoder = nn.ModuleList(
            [_conv(c_coarse + c_fine, c_fine) for c_fine, c_coarse in zip(self.channels[:-1], self.channels[1:])]
        )
        self.features = nn.Sequential(
            _conv(self.channels[0], self.channels[0]), _conv(self.channels[0], feature_channels)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this number."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor, correlation: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, in_channels, *S]`` (and the ``[B, correlation_channels, *S/2]`` map) -> ``E`` ``[B, 8, *S]``."""
        if (correlation is None) != (self.correlation_fusion is None):
            raise ValueError(
                f"correlation must be given exactly when the backbone has correlation_channels "
                f"(here {self.correlation_channels})."
            )
        skips = []
        for index, level in enumerate(self.encoder):
            x = level(x)
            if index == 1 and self.correlation_fusion is not None:
                x = self.correlation_fusion(torch.cat([x, correlation.to(x.dtype)], dim=1))
            skips.append(x)
        x = skips.pop()
        for decode in reversed(self.decoder):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = decode(torch.cat([x, skip], dim=1))
        return self.features(x)


class UniReg(nn.Module):
    """UniReg (paper Fig. 2): backbone features ``E``, control vector ``[T, e, pool(E)]``, dynamic head -> ``ddf``.

    ``forward(moving, fixed, task, reg_type) -> ddf`` ``[B, 3, *S]`` in voxels (MONAI ``Warp`` convention). ``task``
    is a region name of ``tasks`` (or of ``task_aliases``, for unseen anatomy: the nearest trained region), one per
    sample or one for all, or a ``[B]`` tensor of task indices; ``reg_type`` is ``"inter"`` / ``"intra"`` likewise
    (or indices into :data:`REGISTRATION_TYPES`). :meth:`conditioned` fixes both and gives a plain
    ``(moving, fixed) -> ddf`` module for the rest of the library (resizing, evaluation, the command line).

    The network is fully convolutional: it registers any size divisible by 8; ``input_size`` is the size it is
    trained at (the loaders resize pairs to it; paper: 192 x 192 x 160 at 2 mm).

    Args:
        input_size: working size ``(D, H, W)``, each divisible by 8.
        tasks: body regions of the one-hot ``T`` (configuration; order fixes the indices).
        task_aliases: other region names -> one of ``tasks`` (unseen anatomy, Sec. 3.3).
        in_channels: channels of each image.
        channels: encoder channels per level.
        dynamic_head: controller-generated head (``False``: one static head, the Table 6 ablation).
        feature_extractor: ``None`` (images only), ``"mind"`` (MIND-SSC, 12 channels) or an ``nn.Module``
            ``[B, in_channels, *S] -> [B, extractor_channels, *S']`` (kept frozen unless ``train_extractor``).
        extractor_channels: output channels of a module ``feature_extractor``.
        train_extractor: let gradients reach a module extractor's weights.
        correlation: join the 27-channel feature correlation at 1/2 resolution (paper Table 7; ``False``: the
            backbone without it, as checkpoints written before it existed).
    """

    def __init__(
        self,
        input_size: Sequence[int] = (192, 192, 160),
        tasks: Sequence[str] = DEFAULT_TASKS,
        task_aliases: Mapping[str, str] | None = None,
        in_channels: int = 1,
        channels: Sequence[int] = UNIREG_CHANNELS,
        dynamic_head: bool = True,
        feature_extractor: nn.Module | str | None = None,
        extractor_channels: int | None = None,
        train_extractor: bool = False,
        correlation: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = tuple(check_integer(s, "input_size", 1) for s in input_size)
        self.tasks = tuple(str(t) for t in tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct region names, at least one, got {list(tasks)!r}.")
        self.task_aliases = self._check_aliases(task_aliases)
        self.in_channels = check_integer(in_channels, "in_channels", 1)
        self.train_extractor = check_bool(train_extractor, "train_extractor")
        self.extractor, extractor_name, extracted = self._build_extractor(feature_extractor, extractor_channels)
        self.correlation = check_bool(correlation, "correlation")
        self.backbone = UniRegBackbone(
            2 * (self.in_channels + extracted), channels, correlation_channels=len(NEIGHBOUR_OFFSETS) * self.correlation
        )
        if len(self.input_size) != 3 or any(s % self.backbone.divisor for s in self.input_size):
            raise ValueError(
                f"input_size must be 3 sizes divisible by {self.backbone.divisor}, got {tuple(input_size)!r}."
            )
        feature_channels = UNIREG_HEAD_CHANNELS[0]
        self.head = DynamicDeformationHead(
            len(self.tasks) + len(REGISTRATION_TYPES) + feature_channels,
            UNIREG_HEAD_CHANNELS,
            dynamic=check_bool(dynamic_head, "dynamic_head"),
        )
        self.config = {
            "input_size": list(self.input_size),
            "tasks": list(self.tasks),
            "task_aliases": dict(self.task_aliases),
            "in_channels": self.in_channels,
            "channels": list(self.backbone.channels),
            "dynamic_head": self.head.dynamic,
            "feature_extractor": extractor_name,
            "extractor_channels": extracted or None,
            "train_extractor": self.train_extractor,
            "correlation": self.correlation,
        }

    def _check_aliases(self, task_aliases: Mapping[str, str] | None) -> dict[str, str]:
        """Alias -> region; of the defaults, those whose region is among :attr:`tasks` (a given map must be valid)."""
        if task_aliases is None:
            return {a: t for a, t in DEFAULT_TASK_ALIASES.items() if t in self.tasks and a not in self.tasks}
        aliases = {str(a): str(t) for a, t in dict(task_aliases).items()}
        for alias, target in aliases.items():
            if alias in self.tasks or target not in self.tasks:
                raise ValueError(
                    f"task_aliases must map names that are not tasks to one of tasks {list(self.tasks)}, got "
                    f"{alias!r} -> {target!r}."
                )
        return aliases

    def _build_extractor(
        self, extractor: nn.Module | str | None, channels: int | None
    ) -> tuple[nn.Module | None, str | None, int]:
        """The extractor module, its config name (``"mind"``, ``"module"`` or ``None``) and its output channels."""
        if extractor is None:
            return None, None, 0
        if isinstance(extractor, str):
            check_option(extractor, "feature_extractor", ("mind",))
            if self.in_channels != 1:
                raise ValueError(
                    f"feature_extractor='mind' needs single-channel images, got in_channels={self.in_channels}."
                )
            return MINDSSC(radius=2, dilation=2), "mind", 12
        if not isinstance(extractor, nn.Module):
            raise ValueError(f"feature_extractor must be None, 'mind' or an nn.Module, got {type(extractor).__name__}.")
        if channels is None:
            raise ValueError("extractor_channels must give the output channels of a module feature_extractor.")
        return extractor, "module", check_integer(channels, "extractor_channels", 1)

    @property
    def dynamic_head(self) -> bool:
        """Whether the head is generated from the condition (``False``: the static-head ablation)."""
        return self.head.dynamic

    def resolve_task(self, task: str) -> int:
        """Index of region ``task`` in :attr:`tasks`, through :attr:`task_aliases` for unseen anatomy."""
        name = self.task_aliases.get(task, task)
        if name not in self.tasks:
            aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(self.task_aliases.items())) or "none"
            raise ValueError(
                f"unknown task {task!r}: UniReg knows the regions {list(self.tasks)} (aliases for unseen anatomy: "
                f"{aliases}); give the nearest region."
            )
        return self.tasks.index(name)

    def _indices(self, value: Condition, batch: int, name: str, count: int, resolve) -> torch.Tensor:
        """``[B]`` int64 indices of ``value`` (one name, one name per sample, or a tensor of indices)."""
        if isinstance(value, torch.Tensor):
            if value.dtype.is_floating_point or value.dtype == torch.bool or value.numel() not in (1, batch):
                raise ValueError(f"{name} as a tensor must hold 1 or {batch} integer indices, got {value!r}.")
            indices = value.reshape(-1).long().expand(batch)
            if bool(((indices < 0) | (indices >= count)).any()):
                raise ValueError(f"{name} indices must lie in [0, {count}), got {value.tolist()}.")
            return indices
        names = [value] * batch if isinstance(value, str) else list(value)
        if len(names) != batch or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{name} must be one name or {batch} names (one per sample), got {value!r}.")
        return torch.tensor([resolve(n) for n in names], dtype=torch.long)

    def _reg_type_index(self, reg_type: str) -> int:
        check_option(reg_type, "reg_type", REGISTRATION_TYPES)
        return REGISTRATION_TYPES.index(reg_type)

    def features(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Backbone features ``E`` ``[B, 8, *S]`` of a pair ``[B, C, *S]`` (extracted features joined first, and
        their correlation at 1/2 resolution when :attr:`correlation`; the images' own without an extractor)."""
        extracted = {"moving": moving, "fixed": fixed}
        if self.extractor is not None:
            size = moving.shape[2:]
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_extractor):
                for side, image in (("moving", moving), ("fixed", fixed)):
                    features = self.extractor(image)
                    if features.shape[2:] != size:
                        features = resize_image(features, size)
                    extracted[side] = features.to(moving.dtype)
        inputs = [moving, fixed] + ([extracted["moving"], extracted["fixed"]] if self.extractor is not None else [])
        correlation = feature_correlation(extracted["fixed"], extracted["moving"]) if self.correlation else None
        return self.backbone(torch.cat(inputs, dim=1), correlation)

    def control_vector(self, features: torch.Tensor, task: Condition, reg_type: Condition) -> torch.Tensor:
        """``c = [T, e, pool(E)]`` ``[B, n_tasks + 2 + 8]`` (Eq. 3-5) for features ``E`` ``[B, 8, *S]``.

        ``pool(E)`` is the global average of ``E``, L2-normalised (as the paper normalises its SAM embeddings): the
        control vector stays of unit scale however the backbone's features grow in training, so the generated head
        cannot grow with a power of them (without it, training with Adam at 1e-3 diverged within 100 steps).
        """
        batch = features.shape[0]
        tasks = self._indices(task, batch, "task", len(self.tasks), self.resolve_task).to(features.device)
        types = self._indices(reg_type, batch, "reg_type", len(REGISTRATION_TYPES), self._reg_type_index)
        one_hot = F.one_hot(tasks, len(self.tasks)).to(features.dtype)
        intra = (types.to(features.device) == REGISTRATION_TYPES.index("intra")).to(features.dtype)[:, None]
        encoding = torch.cat([intra, 1.0 - intra], dim=1)
        pooled = F.normalize(features.mean(dim=(2, 3, 4)), dim=1)
        return torch.cat([one_hot, encoding, pooled], dim=1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, task: Condition, reg_type: Condition) -> torch.Tensor:
        """``[B, C, *S]`` pair (sizes divisible by 8), task and registration type -> ``[B, 3, *S]`` ddf in voxels."""
        check_image_pair(moving, fixed, 3)
        if moving.shape[1] != self.in_channels:
            raise ValueError(f"moving and fixed must have {self.in_channels} channel(s), got {moving.shape[1]}.")
        divisor = self.backbone.divisor
        if any(s % divisor for s in moving.shape[2:]):
            raise ValueError(
                f"moving and fixed sizes must be divisible by {divisor}, got {tuple(moving.shape[2:])}; resize them "
                "(e.g. to input_size, or wrap the network in ResizedRegistration)."
            )
        features = self.features(moving, fixed)
        return self.head(features, self.control_vector(features, task, reg_type))

    def parameter_groups(self, learning_rate: float, head_scale: float = 1.0) -> list[dict]:
        """Optimiser parameter groups: the backbone (and extractor) at ``learning_rate``, the head (controller or
        static parameters) at ``head_scale * learning_rate``."""
        head = list(self.head.parameters())
        head_ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if id(p) not in head_ids]
        return [{"params": rest, "lr": learning_rate}, {"params": head, "lr": head_scale * learning_rate}]

    def conditioned(self, task: Condition, reg_type: Condition) -> ConditionedUniReg:
        """This network with its task and registration type fixed: a ``(moving, fixed) -> ddf`` module."""
        return ConditionedUniReg(self, task, reg_type)


class ConditionedUniReg(nn.Module):
    """A :class:`UniReg` with fixed conditions, ``forward(moving, fixed) -> ddf`` like every other network.

    The task is resolved (aliases included) at construction, so an unknown name fails at once.

    Args:
        network: the UniReg.
        task: region name (or alias) or indices, as :meth:`UniReg.forward`.
        reg_type: ``"inter"`` or ``"intra"`` (or indices).
    """

    def __init__(self, network: UniReg, task: Condition, reg_type: Condition) -> None:
        super().__init__()
        self.network = network
        if isinstance(task, str):
            network.resolve_task(task)
        if isinstance(reg_type, str):
            check_option(reg_type, "reg_type", REGISTRATION_TYPES)
        self.task, self.reg_type = task, reg_type

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.network(moving, fixed, self.task, self.reg_type)


def load_unireg(path: str | os.PathLike, feature_extractor: nn.Module | None = None) -> UniReg:
    """A :class:`UniReg` built from a checkpoint's ``"config"`` and filled with its weights (``model.pt`` or
    ``checkpoint_epoch=N.pt`` of the bundle's train.yaml). A network trained with a module feature extractor needs
    that module again (``feature_extractor``); mismatched files raise a ``ValueError`` naming the file."""
    return load_network(path, functools.partial(_unireg_from_config, os.fspath(path), feature_extractor), "UniReg")


def _unireg_from_config(path: str, extractor: nn.Module | None, config: dict | None) -> UniReg:
    if config is None:
        raise ValueError(f"weights file {path!r} is not a UniReg checkpoint (no 'config': its tasks and sizes).")
    config = {"correlation": False, **config}  # checkpoints written before the correlation layer have none
    if config.get("feature_extractor") == "module":
        if extractor is None:
            raise ValueError(
                f"weights file {path!r} was trained with a module feature extractor "
                f"({config.get('extractor_channels')} channels); pass it as feature_extractor."
            )
        config["feature_extractor"] = extractor
    elif extractor is not None:
        raise ValueError(f"weights file {path!r} was trained without a module feature extractor; do not pass one.")
    try:
        return UniReg(**config)
    except TypeError as error:
        raise ValueError(
            f"weights file {path!r} is not a UniReg checkpoint (its config does not fit): {error}"
        ) from None
