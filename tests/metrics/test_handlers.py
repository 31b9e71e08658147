"""Tests of the ignite handlers (monai_unireg.metrics.handlers) with a tiny ignite Engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.handlers import from_engine

from monai_unireg.metrics import HD95, Jacobian, LabelDice, folding_percentage

SHAPE = (20, 24, 24)


def _plate() -> torch.Tensor:
    """``[1, *SHAPE]`` label 1 plate, 8 voxels thick along axis 0 (see test_surface for why HD95 is exact)."""
    y = torch.zeros((1,) + SHAPE, dtype=torch.int64)
    y[0, 4:12, 2:22, 2:22] = 1
    return y


def _affine(spacing_axis0: float) -> torch.Tensor:
    return torch.diag(torch.tensor([spacing_axis0, 1.0, 1.0, 1.0], dtype=torch.float64))


def _label_items() -> list[dict]:
    """Two pairs, each fixed plate and its copy shifted 2 voxels along axis 0, with 2.5 mm and 1.5 mm voxels."""
    fixed = _plate()
    moving = torch.roll(fixed, 2, dims=1)
    return [{"pred": moving, "label": MetaTensor(fixed, affine=_affine(s))} for s in (2.5, 1.5)]


def _run(handler, name: str, batches: list, step: Callable = lambda engine, batch: batch) -> Engine:
    engine = Engine(step)
    handler.attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine


@pytest.mark.parametrize("decollate", [False, True])
def test_label_dice(decollate: bool) -> None:
    batch = list_data_collate(_label_items())
    step = (lambda engine, b: decollate_batch(b)) if decollate else (lambda engine, b: b)
    handler = LabelDice(labels=[1, 2], output_transform=from_engine(["pred", "label"]))
    engine = _run(handler, "dice", [batch, batch], step)
    assert engine.state.metrics["dice"] == pytest.approx(0.75)  # 8-voxel-thick plates shifted by 2; label 2 skipped
    details = engine.state.metric_details["dice"]
    assert details.shape == (4, 2) and torch.isnan(details[:, 1]).all()


@pytest.mark.parametrize("decollate", [False, True])
def test_hd95_reads_spacing_from_meta_tensor(decollate: bool) -> None:
    batch = list_data_collate(_label_items())
    assert batch["label"].affine.shape == (2, 4, 4)
    step = (lambda engine, b: decollate_batch(b)) if decollate else (lambda engine, b: b)
    engine = _run(HD95(output_transform=from_engine(["pred", "label"])), "hd95", [batch], step)
    assert torch.allclose(engine.state.metric_details["hd95"], torch.tensor([[5.0], [3.0]]), atol=1e-5)
    assert engine.state.metrics["hd95"] == pytest.approx(4.0, abs=1e-5)


def test_hd95_explicit_spacing_overrides_meta() -> None:
    batch = list_data_collate(_label_items())
    handler = HD95(spacing=(0.5, 1.0, 1.0), output_transform=from_engine(["pred", "label"]))
    engine = _run(handler, "hd95", [batch])
    assert engine.state.metrics["hd95"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("decollate", [False, True])
def test_jacobian(decollate: bool) -> None:
    ddf = torch.zeros((2, 3) + SHAPE)
    ddf[1, 0, :, 5:10, 5:10] = -2.0 * torch.arange(SHAPE[0], dtype=torch.float32).view(-1, 1, 1)
    step = (lambda engine, b: decollate_batch(b)) if decollate else (lambda engine, b: b)
    engine = _run(Jacobian(output_transform=from_engine(["ddf"])), "jac", [{"ddf": ddf}], step)
    expected = folding_percentage(ddf).mean().item()
    assert expected > 0
    assert engine.state.metrics["jac_folding_percent"] == pytest.approx(expected, rel=1e-6)
    assert engine.state.metrics["jac_sdlogj"] > 0
    assert engine.state.metrics["jac"] == {
        "jac_sdlogj": engine.state.metrics["jac_sdlogj"],
        "jac_folding_percent": engine.state.metrics["jac_folding_percent"],
    }
    assert engine.state.metric_details["jac"].shape == (2, 2)


def test_jacobian_rejects_unknown_output() -> None:
    with pytest.raises(ValueError, match="output"):
        _run(Jacobian(output_transform=lambda out: "ddf"), "jac", [0])
