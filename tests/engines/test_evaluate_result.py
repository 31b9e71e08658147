"""evaluate_result computes Dice and HD95 with the metrics' functions (no MONAI import): the metrics' own values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from monai_unireg.engines.pair_registration import LoadedPair, RegistrationResult, evaluate_result
from monai_unireg.metrics import HD95Metric, LabelDiceMetric


def _labels(generator: torch.Generator, values: tuple[int, ...]) -> torch.Tensor:
    blocks = torch.randint(0, len(values), (1, 1, 5, 6, 4), generator=generator)
    coarse = torch.tensor(values)[blocks]
    return coarse.repeat_interleave(3, 2).repeat_interleave(3, 3).repeat_interleave(3, 4).to(torch.int32)


def test_dice_and_hd95_are_the_metrics_values() -> None:
    generator = torch.Generator().manual_seed(5)
    fixed_label = _labels(generator, (0, 1, 2, 4))
    moving_label = _labels(generator, (0, 1, 2, 4, 7))  # 7: in the moving map only (one-sided)
    warped_label = _labels(generator, (0, 1, 2, 7))  # 4 lost, 7 one-sided
    shape = tuple(fixed_label.shape[2:])
    affine = np.diag([1.5, 2.0, 1.0, 1.0])
    image = torch.rand(1, 1, *shape, generator=generator)
    pair = LoadedPair(image, image, affine, fixed_label=fixed_label, moving_label=moving_label)
    result = RegistrationResult(torch.zeros(1, 3, *shape), image, warped_label, 0.0, "mri")
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        metrics = evaluate_result(pair, result, labels=[1, 2, 4, 7])
    values = [1, 2, 4, 7]
    dice = LabelDiceMetric(labels=values)(warped_label, fixed_label)[0].tolist()
    before = LabelDiceMetric(labels=values)(moving_label, fixed_label)[0].tolist()
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        hd95 = HD95Metric(labels=values, spacing=pair.spacing)(warped_label, fixed_label)[0].tolist()
    assert [metrics["dice"][str(v)] for v in values] == dice
    assert [metrics["dice_before"][str(v)] for v in values] == before
    assert [metrics["hd95_mm"][str(v)] for v in values] == [None if math.isnan(h) else h for h in hd95]
    assert any(math.isnan(h) for h in hd95)  # the one-sided labels were exercised
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
