"""Ignite handlers of the registration metrics, for MONAI workflows and bundles.

Each handler wraps one metric of this package in :class:`monai.handlers.IgniteMetricHandler`, so it attaches
to an ignite ``Engine`` (e.g. a ``monai.engines.SupervisedEvaluator``) and writes its value to
``engine.state.metrics[name]`` at the end of every run, and (with ``save_details=True``) the per-sample,
per-label table to ``engine.state.metric_details[name]``.

Bundle example (evaluate.yaml; the evaluator's step puts the warped moving labels, the fixed labels as loaded,
a MetaTensor that carries the spacing, and the field into its output)::

    evaluator:
      _target_: SupervisedEvaluator
      key_val_metric:
        val_dice:
          _target_: monai_unireg.metrics.LabelDice
          labels: "@evaluation_labels"
          output_transform: "$monai.handlers.from_engine(['warped_label', 'fixed_label'])"
      additional_metrics:
        val_hd95:
          _target_: monai_unireg.metrics.HD95
          output_transform: "$monai.handlers.from_engine(['warped_label', 'fixed_label'])"
        val_jacobian:
          _target_: monai_unireg.metrics.Jacobian
          output_transform: "$monai.handlers.from_engine(['ddf'])"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler

from monai_unireg.metrics.dice import LabelDiceMetric
from monai_unireg.metrics.jacobian import JacobianMetric
from monai_unireg.metrics.surface import HD95Metric, SpacingLike

__all__ = ["LabelDice", "HD95", "Jacobian"]


def _identity(output: Any) -> Any:
    return output


class LabelDice(IgniteMetricHandler):
    """Handler of :class:`~monai_unireg.metrics.LabelDiceMetric`: mean per-label Dice of the run.

    Args:
        labels: label values to evaluate, or ``None`` to take them from the fixed labels of the first batch.
        absent_as_zero: count a label absent from both maps as 0 instead of skipping it.
        reduction: reduction of the run's ``[N, L]`` table (default ``"mean"``: mean over pairs of the per-pair
            mean over labels), see :func:`~monai_unireg.metrics.labels.reduce_label_metric`.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``: the warped moving labels and the
            fixed labels, ``[B, 1, *S]`` tensors or lists of ``[1, *S]``.
        save_details: store the ``[N, L]`` table in ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        absent_as_zero: bool = False,
        reduction: str = "mean",
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric = LabelDiceMetric(labels=labels, absent_as_zero=absent_as_zero, reduction=reduction)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


class HD95(IgniteMetricHandler):
    """Handler of :class:`~monai_unireg.metrics.HD95Metric`: mean per-label HD95 of the run, in mm.

    The voxel spacing of each batch is the ``spacing`` given here if any, else read from ``y``: the affine of a
    MetaTensor (as loaded by ``LoadImaged`` and collated by MONAI's data loader, or each item of a decollated
    list), spacing = norms of the affine's columns; else 1 voxel, with a warning.

    Args:
        labels: label values to evaluate, or ``None`` to take them from the fixed labels of the first batch.
        spacing: explicit voxel spacing in mm (number or one per spatial axis), overriding the MetaTensor affine.
        percentile: percentile of each directed surface-distance set (95 for HD95).
        missing_value: value for a label present in only one map (default NaN: skipped, with a warning).
        reduction: reduction of the run's ``[N, L]`` table, see
            :func:`~monai_unireg.metrics.labels.reduce_label_metric`.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``: the warped moving labels and the
            fixed labels (MetaTensors carry the spacing), ``[B, 1, *S]`` or lists of ``[1, *S]``.
        save_details: store the ``[N, L]`` table in ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        spacing: SpacingLike | None = None,
        percentile: float = 95.0,
        missing_value: float = float("nan"),
        reduction: str = "mean",
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric = HD95Metric(
            labels=labels, spacing=spacing, percentile=percentile, missing_value=missing_value, reduction=reduction
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


def _ddf_batch(output: Any) -> torch.Tensor | list[torch.Tensor]:
    """The displacement fields in ``output``: a ``[B, n, *S]`` tensor, a list of ``[n, *S]`` tensors (decollated
    batch), or a 1-tuple holding either (``monai.handlers.from_engine(["ddf"])`` on a collated batch)."""
    if isinstance(output, tuple) and len(output) == 1:
        output = output[0]
    if isinstance(output, (torch.Tensor, list)):
        return output
    raise ValueError(
        f"output must hold the displacement field(s); check output_transform, got {type(output).__name__}."
    )


class Jacobian(IgniteMetricHandler):
    """Handler of :class:`~monai_unireg.metrics.JacobianMetric`: SDlogJ and folding percentage of the run.

    Its value is a dict, which ignite also flattens into ``engine.state.metrics``: with the handler attached as
    ``name``, ``engine.state.metrics[f"{name}_sdlogj"]`` and ``[f"{name}_folding_percent"]`` hold the means over
    the fields of the run (floats) and ``engine.state.metrics[name]`` the dict. Use one of the flattened keys,
    not ``name``, as a key metric.

    Args:
        mode: SDlogJ definition, ``"l2r"`` (Learn2Reg "+3" convention, default) or ``"exact"``.
        crop: voxels removed at every border before both statistics (Learn2Reg: 2).
        output_transform: maps ``engine.state.output`` to the displacement field(s) ``[B, n, *S]`` in voxels
            (or a list of ``[n, *S]``).
        save_details: store the ``[N, 2]`` table (SDlogJ, folding %) in ``engine.state.metric_details[name]``.
    """

    def __init__(
        self, mode: str = "l2r", crop: int = 2, output_transform: Callable = _identity, save_details: bool = True
    ) -> None:
        metric = JacobianMetric(mode=mode, crop=crop)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        """Add one batch of displacement fields (see :func:`_ddf_batch` for the accepted forms)."""
        self.metric_fn(_ddf_batch(output))

    def compute(self) -> dict[str, float]:
        """``{f"{name}_sdlogj": mean SDlogJ, f"{name}_folding_percent": mean folding %}`` of the run."""
        prefix = f"{self._name}_" if self._name else ""
        return {f"{prefix}{key}": float(value) for key, value in super().compute().items()}
