"""A registration network as MONAI's bundle tools expect it: one ``image`` input, the pair stacked as channels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from monai_unireg.validation import check_image

__all__ = ["PairInput"]

_PREFIX = "network."


class PairInput(nn.Module):
    """``forward(image) -> ddf`` for a registration network ``network(moving, fixed, **conditions) -> ddf``.

    ``image`` is ``[B, 2C, *S]``: the moving image's ``C`` channels, then the fixed image's (the ``[moving, fixed]``
    input of model-zoo's ``mednist_reg``), so ``monai.bundle verify_net_in_out``, ``ckpt_export`` and a MONAI
    ``SupervisedEvaluator`` (``inferer(image, network)``) drive the network like any other bundle's.

    The state dict is the wrapped network's own (no ``network.`` prefix), so a ``model.pt`` of the network loads
    into this module with every key matched (``CheckpointLoader(strict=True)``) and the other way round.

    Args:
        network: ``network(moving, fixed, **conditions)`` returning a ``[B, n, *S]`` displacement field.
        conditions: fixed keyword arguments of every call (e.g. UniReg's ``task`` and ``reg_type``).
    """

    def __init__(self, network: nn.Module, conditions: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network
        self.conditions = dict(conditions or {})
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, image: torch.Tensor, **conditions: Any) -> torch.Tensor:
        """``[B, 2C, *S]`` stacked ``[moving, fixed]`` -> ``[B, n, *S]`` displacement (the network's output);
        keyword ``conditions`` of this call (e.g. per-pair ``task`` and ``reg_type`` indices) join, and override, the
        fixed ones."""
        if not torch.jit.is_tracing():
            if not isinstance(image, torch.Tensor) or image.ndim < 3:
                raise ValueError(
                    "image must be a [B, 2C, *spatial] tensor (the moving and the fixed image stacked as channels), "
                    f"got {type(image).__name__} of shape {tuple(getattr(image, 'shape', ()))}."
                )
            check_image(image, "image", image.ndim - 2)
            if image.shape[1] % 2:
                raise ValueError(
                    f"image must stack the moving and the fixed image as channels ([moving, fixed], an even number of "
                    f"channels), got shape {tuple(image.shape)}."
                )
        channels = image.shape[1] // 2
        return self.network(image[:, :channels], image[:, channels:], **{**self.conditions, **conditions})


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [key for key in state_dict if key.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX) :]] = state_dict.pop(key)


def _add_prefix(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix) :]] = state_dict.pop(key)
