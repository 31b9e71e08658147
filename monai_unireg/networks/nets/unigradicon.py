"""uniGradICON: the GradICON multi-step UNet cascade trained as a universal registration model.

Tian et al., "uniGradICON: A Foundation Model for Medical Image Registration", MICCAI 2024
(``shared/papers/unigradicon.txt``), built on GradICON (Tian et al., CVPR 2023); architecture details and the
published weights' layout in ``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.io import check_checkpoint_method, load_weights
from monai_unireg.spatial import _compose, _normalized_voxel_size, _warp, resize_ddf, resize_image
from monai_unireg.validation import check_bool, check_image_pair, check_integer

__all__ = [
    "GradICONUNet",
    "UniGradICON",
    "load_unigradicon",
    "load_unigradicon_weights",
    "published_key_prefixes",
    "PUBLISHED_DOWN_CHANNELS",
    "PUBLISHED_UP_CHANNELS",
]

#: Encoder output channels of the published UNet ("tallUNet2"), after the 2-channel input.
PUBLISHED_DOWN_CHANNELS = (16, 32, 64, 256, 512)
#: Decoder output channels of the published UNet, finest level first.
PUBLISHED_UP_CHANNELS = (16, 32, 64, 128, 256)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or prepend zero channels up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0) * (x.ndim - 2) + (channels - x.shape[1], 0))


class GradICONUNet(nn.Module):
    """The UNet of every GradICON / uniGradICON step ("tallUNet2" of ``icon_registration``).

    Encoder level ``k``: ``x <- conv_s2(leaky_relu(x)) + match_channels(avg_pool_2(x))`` (3x3x3 convolution,
    stride 2; average pooling in ceil mode; channels matched by prepending zeros or cropping). Decoder level ``k``
    (coarsest first): ``x <- BatchNorm(convT(leaky_relu(x)) + upsample_2(match_channels(x)))`` (4x4x4 transposed
    convolution, stride 2; trilinear upsampling), cropped to the skip's size and concatenated with the skip.
    A final 3x3x3 convolution, initialised to zero, gives the displacement divided by 10, so a new network
    predicts the identity map.

    With the published channels (:data:`PUBLISHED_DOWN_CHANNELS`, :data:`PUBLISHED_UP_CHANNELS`) it has
    17,670,229 parameters and 47 state-dict tensors, like the released weights.

    Args:
        down_channels: encoder output channels per level (the input has ``2 * in_channels``).
        up_channels: decoder output channels per level, finest first (same length as ``down_channels``).
        in_channels: channels of each image.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        down_channels: Sequence[int] = PUBLISHED_DOWN_CHANNELS,
        up_channels: Sequence[int] = PUBLISHED_UP_CHANNELS,
        in_channels: int = 1,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if len(down_channels) != len(up_channels) or not down_channels:
            raise ValueError(
                f"down_channels and up_channels must be non-empty and of equal length, got {tuple(down_channels)} "
                f"and {tuple(up_channels)}."
            )
        for value in (*down_channels, *up_channels):
            check_integer(value, "down_channels/up_channels", 1)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        conv, conv_transpose, batch_norm = (
            (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)
            if spatial_dims == 3
            else (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
        )
        encoder = [2 * check_integer(in_channels, "in_channels", 1), *down_channels]
        decoder_in = [
            encoder[k + 1] + (up_channels[k + 1] if k + 1 < len(up_channels) else 0) for k in range(len(up_channels))
        ]
        self.downConvs = nn.ModuleList(
            conv(encoder[k], encoder[k + 1], kernel_size=3, padding=1, stride=2) for k in range(len(down_channels))
        )
        self.upConvs = nn.ModuleList(
            conv_transpose(decoder_in[k], up_channels[k], kernel_size=4, padding=1, stride=2)
            for k in range(len(up_channels))
        )
        self.batchNorms = nn.ModuleList(batch_norm(channels) for channels in up_channels)
        self.lastConv = conv(encoder[0] + up_channels[0], spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)
        # channels-last weights and activations: oneDNN's (transposed) convolutions run 2-4x faster on the CPU
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        self.to(memory_format=self.memory_format)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement of ``moving`` onto ``fixed`` in the reference code's units.

        Args:
            moving: ``[B, in_channels, *S]``.
            fixed: ``[B, in_channels, *S]``.

        Returns:
            ``[B, spatial_dims, *S]`` displacement in normalised ``[0, 1]`` units per axis (one voxel along an
            axis of ``N`` voxels is ``1 / (N - 1)``), channel ``i`` along spatial axis ``i``; in channels-last
            memory format, which :mod:`monai_unireg.spatial` reads without a copy.
        """
        pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
        x = torch.empty(
            (moving.shape[0], moving.shape[1] + fixed.shape[1], *moving.shape[2:]),
            dtype=torch.promote_types(moving.dtype, fixed.dtype),
            device=moving.device,
            memory_format=self.memory_format,
        )
        x[:, : moving.shape[1]] = moving
        x[:, moving.shape[1] :] = fixed
        skips = []
        for down in self.downConvs:
            skips.append(x)
            y = down(F.leaky_relu(x))
            x = y + _match_channels(pool(x, 2, ceil_mode=True), y.shape[1])
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        for level in reversed(range(len(self.upConvs))):
            y = self.upConvs[level](F.leaky_relu(x))
            matched = _match_channels(x, y.shape[1]).contiguous(memory_format=self.memory_format)  # 1.6x faster
            upsampled = F.interpolate(matched, scale_factor=2, mode=mode, align_corners=False)
            skip = skips[level]
            crop = (slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))
            norm = self.batchNorms[level]
            if norm.training or torch.is_grad_enabled():
                x = torch.cat([norm(y + upsampled)[crop], skip], dim=1)
            elif level == 0:
                return self._last_conv_in_parts(_batch_norm_in_place(upsampled.add_(y), norm), skip)
            else:  # inference: crop first and normalise in place (per-channel affine: the same values), written
                # straight into the concatenation's buffer (no cropped copy, no concatenation pass)
                x = torch.empty(
                    (skip.shape[0], y.shape[1] + skip.shape[1], *skip.shape[2:]),
                    dtype=y.dtype,
                    device=y.device,
                    memory_format=self.memory_format,
                )
                _batch_norm_in_place(torch.add(y[crop], upsampled[crop], out=x[:, : y.shape[1]]), norm)
                x[:, y.shape[1] :] = skip
        return self.lastConv(x).div_(10)

    def _last_conv_in_parts(self, decoded: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Inference form of ``lastConv(cat([decoded[crop], skip])) / 10`` without the full-resolution concatenation.

        The convolution is linear in its input channels, so it is the sum of one convolution over the decoded
        channels and one over the skip's. ``decoded`` may be one voxel longer than ``skip`` along an axis (odd
        sizes); that last slice is zeroed, so the convolution's values inside the crop see the same zero padding
        as the cropped input. Saves writing (and first touching) an ``(up_channels[0] + 2) x S`` buffer.

        Args:
            decoded: ``[B, up_channels[0], *S']`` last decoder output, ``S' >= S`` by at most one voxel per axis;
                modified in place.
            skip: ``[B, 2 * in_channels, *S]`` the input pair.

        Returns:
            ``[B, spatial_dims, *S]`` as :meth:`forward`.
        """
        conv = F.conv3d if self.spatial_dims == 3 else F.conv2d
        for axis, size in enumerate(skip.shape[2:], start=2):
            decoded.narrow(axis, size, decoded.shape[axis] - size).zero_()
        channels = decoded.shape[1]
        weight, bias = self.lastConv.weight, self.lastConv.bias
        parts = [weight[:, :channels], weight[:, channels:]]
        decoded_weight, skip_weight = (part.contiguous(memory_format=self.memory_format) for part in parts)
        from_decoded = conv(decoded, decoded_weight, bias, padding=1)
        out = conv(skip, skip_weight, padding=1)
        crop = (slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))
        return out.add_(from_decoded[crop]).div_(10)


def _batch_norm_in_place(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``norm(x)`` with running statistics, written into ``x``: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    view = (1, -1, *([1] * (x.ndim - 2)))
    return x.mul_(scale.view(view)).add_(shift.view(view))


#: Downsampling level of each step of the published cascade: 1/4, 1/2, full (step 1) and full (step 2).
STEP_LEVELS = (2, 1, 0, 0)


class UniGradICON(nn.Module):
    """uniGradICON / GradICON registration network: a cascade of :class:`GradICONUNet` steps.

    Step 1 is a three-level multi-resolution cascade: a UNet on the images average-pooled to 1/4, a UNet at 1/2
    on the moving image warped by the field so far, a UNet at full resolution likewise; step 2 is one more
    full-resolution UNet on the result (paper Sec. 2.2). The map of the whole cascade is the composition
    ``phi_1 o phi_2 o ... o phi_k`` of the steps' maps, each step's field evaluated at the points of the next one
    (the reference code's function composition; :func:`monai_unireg.spatial.compose` across grids).

    ``forward`` resizes both images to ``input_size`` (trilinear, corner-aligned; the paper's 175^3 ignores the
    aspect ratio), runs the cascade there and brings the field back to the input grid (values rescaled), so the
    result is in voxels of the input, in the MONAI ``Warp`` convention. Intensities are expected in [0, 1]
    (CT: HU clipped to [-1000, 1000]; MRI: clipped at the 99th percentile; see :mod:`monai_unireg.transforms`).

    A new network predicts the identity map (zero-initialised last convolutions). With the published channels the
    four UNets hold 70,680,916 parameters (17,670,229 each).

    Args:
        input_size: working size (int for a cube, or one size per axis); 175 in the paper. It must survive every
            average pooling of the coarsest step's UNet (at least 65 with the published 5 levels, 32 with 3).
        include_step2: build the fourth UNet (training stage 2, the published model); ``False`` is stage 1.
        down_channels: encoder channels of every UNet (smaller values for tests and CPU experiments).
        up_channels: decoder channels of every UNet.
        in_channels: channels of each image.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 175,
        include_step2: bool = True,
        down_channels: Sequence[int] = PUBLISHED_DOWN_CHANNELS,
        up_channels: Sequence[int] = PUBLISHED_UP_CHANNELS,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        sizes = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
        if len(sizes) != 3:
            raise ValueError(f"input_size must be an int or 3 sizes, got {input_size!r}.")
        self.input_size = tuple(check_integer(s, "input_size", 1) for s in sizes)
        _check_poolable(self.input_size, max(STEP_LEVELS) + len(down_channels))
        self.include_step2 = check_bool(include_step2, "include_step2")
        self.levels = STEP_LEVELS if self.include_step2 else STEP_LEVELS[:3]
        self.unets = nn.ModuleList(
            GradICONUNet(down_channels, up_channels, in_channels=in_channels, spatial_dims=3) for _ in self.levels
        )
        self._last_steps: list[torch.Tensor] | None = None
        self.config = {
            "input_size": list(self.input_size),
            "include_step2": self.include_step2,
            "down_channels": [int(c) for c in down_channels],
            "up_channels": [int(c) for c in up_channels],
            "in_channels": int(in_channels),
        }

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``[B, C, D, H, W]`` moving image, intensities in [0, 1].
            fixed: ``[B, C, D, H, W]`` fixed image on the same grid.

        Returns:
            ``[B, 3, D, H, W]`` displacement in voxels of the input grid, ``warp(moving, ddf) ~ fixed``.
        """
        check_image_pair(moving, fixed)
        shape = tuple(moving.shape[2:])
        ddf = self.working_field(self.to_working_size(moving), self.to_working_size(fixed))
        return ddf if shape == self.input_size else resize_ddf(ddf, shape)

    def to_working_size(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` image resized to ``input_size`` (trilinear, corner-aligned), unchanged if already there."""
        return image if tuple(image.shape[2:]) == self.input_size else resize_image(image, self.input_size)

    def working_field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The cascade on images already at the working size.

        Args:
            moving: ``[B, C, *input_size]``.
            fixed: ``[B, C, *input_size]``.

        Returns:
            ``[B, 3, *input_size]`` displacement in voxels of the working grid.
        """
        moving_pyramid, fixed_pyramid = [moving], [fixed]
        for _ in range(max(self.levels)):
            moving_pyramid.append(F.avg_pool3d(moving_pyramid[-1], 2, ceil_mode=True))
            fixed_pyramid.append(F.avg_pool3d(fixed_pyramid[-1], 2, ceil_mode=True))
        fields: list[torch.Tensor] = []
        for unet, level in zip(self.unets, self.levels):
            level_moving = moving_pyramid[level]
            if fields:
                level_moving = _warp(level_moving, self.chain(fields, level_moving.shape[2:]))
            step = unet(level_moving, fixed_pyramid[level])
            fields.append(step.div_(_normalized_voxel_size(step, "[0,1]")))  # in place: a fresh output
        self._last_steps = fields if torch.is_grad_enabled() else None
        return self.chain(fields, moving.shape[2:])

    def pop_steps(self) -> list[torch.Tensor]:
        """The step fields ``[u_1, ..., u_k]`` of the last forward pass run with gradients, handed over once.

        ``u_i`` ``[B, 3, *S_i]`` is step ``i``'s displacement in voxels of its own grid (``S_1`` = 1/4 of the working
        size, the last = the working size), all over one field of view; the cascade's map is
        ``phi_1 o ... o phi_k``. Training calls the network through its (possibly ``DistributedDataParallel``)
        wrapper and then reads the steps here, so that GradICON composes the step functions at its sample points
        as the reference does (:class:`~monai_unireg.losses.GradICONLoss`).
        """
        if self._last_steps is None:
            raise ValueError("no step fields to hand over: run a forward pass with gradients enabled first.")
        steps, self._last_steps = self._last_steps, None
        return steps

    @staticmethod
    def chain(fields: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """Field of ``phi_1 o phi_2 o ... o phi_k`` on a grid of ``shape``, from the steps' voxel fields.

        Each field may live on its own grid over the same field of view; the last step is applied first, and each
        earlier field is evaluated at the points reached so far.
        """
        shape = tuple(int(s) for s in shape)
        last = fields[-1]
        ddf = last if tuple(last.shape[2:]) == shape else resize_ddf(last, shape)  # = compose(last, 0)
        for field in reversed(fields[:-1]):
            ddf = _compose(field, ddf)
        return ddf


def _check_poolable(size: tuple[int, ...], poolings: int) -> None:
    """Raise unless ``poolings`` average poolings (x0.5, ceil mode) of ``size`` keep at least 2 voxels per axis."""
    current = size
    for _ in range(poolings):
        if min(current) < 2:
            raise ValueError(
                f"input_size {size} is too small: the coarsest UNet would pool a {current} grid; use a larger "
                f"input_size or fewer UNet levels (down_channels)."
            )
        current = tuple(-(-s // 2) for s in current)


def published_key_prefixes(num_steps: int = 4) -> tuple[str, ...]:
    """State-dict key prefix of each UNet in the reference code's registration net, coarsest step first.

    ``num_steps=4`` is the published ``Step_2_final.trch`` (METHODS.md); ``3`` a stage-1 network. The nesting
    follows ``TwoStepRegistration(netPhi, netPsi)`` and ``DownsampleRegistration(net)`` of ``icon_registration``.
    """
    if num_steps == 4:
        return tuple("netPhi." + prefix for prefix in published_key_prefixes(3)[:3]) + ("netPsi.net.",)
    if num_steps == 3:
        return ("netPhi.net.netPhi.net.net.", "netPhi.net.netPsi.net.", "netPsi.net.")
    raise ValueError(f"num_steps must be 3 or 4, got {num_steps!r}.")


def load_unigradicon(path: str | os.PathLike) -> UniGradICON:
    """A :class:`UniGradICON` built and filled from a weights file.

    A checkpoint of ours stores the network's constructor arguments under ``"config"`` (any size and channels);
    any other file (e.g. the released ``Step_2_final.trch``) gets the published 4-step network at 175^3.
    """
    config = _read_state(os.fspath(path)).get("config")
    try:
        network = UniGradICON(**config) if isinstance(config, dict) else UniGradICON()
    except TypeError as error:  # a config of another network: unexpected or missing constructor arguments
        raise ValueError(
            f"weights file {os.fspath(path)!r} was not written for UniGradICON: its network config does not fit "
            f"({error})."
        ) from None
    return load_unigradicon_weights(network, path)


def _read_state(path: str) -> dict:
    """The dictionary stored in the weights file ``path`` (:func:`monai_unireg.io.load_weights`)."""
    state = load_weights(path)
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} does not hold a state dict of tensors.")
    check_checkpoint_method(state, "UniGradICON", path)
    return state


def load_unigradicon_weights(network: UniGradICON, path: str | os.PathLike) -> UniGradICON:
    """Load weights into ``network``: the published ``Step_2_final.trch`` layout, or our own checkpoints.

    Accepted files (read with ``torch.load(weights_only=True)``, so no code in them runs):

    - the reference code's state dict (keys under :func:`published_key_prefixes`, 47 tensors per UNet), e.g.
      the released uniGradICON weights; non-persistent ``identity_map`` entries are ignored if present;
    - a state dict of :class:`UniGradICON` (keys ``unets.k.*``), or a training checkpoint holding one under
      ``"model"`` (:mod:`monai_unireg.engines.unigradicon`).

    Every tensor must land: missing, unexpected or mis-shaped entries raise a ``ValueError`` naming them.

    Args:
        network: the network to fill (its channels and number of steps must match the file).
        path: the weights file.

    Returns:
        ``network``, for chaining.
    """
    path = os.fspath(path)
    state = _read_state(path)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"weights file {path!r} does not hold a state dict of tensors.")
    if not any(key.startswith("unets.") for key in state):
        state = _from_published_layout(state, len(network.unets), path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights file {path!r} does not fit this network: {error}") from error
    return network


def _from_published_layout(state: dict[str, torch.Tensor], num_steps: int, path: str) -> dict[str, torch.Tensor]:
    """Rename the reference code's keys to ``unets.k.*``; unknown keys raise a ``ValueError``."""
    prefixes = published_key_prefixes(num_steps)
    renamed, unknown = {}, []
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] == "identity_map":
            continue
        step = next((k for k, prefix in enumerate(prefixes) if key.startswith(prefix)), None)
        if step is None:
            unknown.append(key)
        else:
            renamed[f"unets.{step}.{key[len(prefixes[step]) :]}"] = value
    if unknown:
        raise ValueError(
            f"weights file {path!r} has keys outside the {num_steps}-step uniGradICON layout "
            f"(expected prefixes {prefixes}): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    return renamed
