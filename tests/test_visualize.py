"""Overview pictures: a readable PNG is written atomically; bad shapes are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_unireg.visualize import save_overview


def phantom(shape=(20, 24, 28)):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0)
    radius = np.linalg.norm((grid - np.array(shape).reshape(3, 1, 1, 1) / 2) / 6, axis=0)
    labels = (radius < 1).astype(np.int16) + (radius < 0.5)
    return labels.astype(np.float32) / 2, labels


def test_overview_png_is_written(tmp_path):
    image, labels = phantom()
    ddf = torch.zeros(3, *image.shape)
    ddf[0, 5:15, 5:15, 5:15] = -4.0  # folds at the box faces
    path = save_overview(tmp_path / "overview.png", image, image, image, ddf, fixed_label=labels,
                         warped_label=labels, spacing=(2.0, 1.0, 1.5), title="test")  # fmt: skip
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_overview_refuses_mismatched_field(tmp_path):
    image, _ = phantom()
    with pytest.raises(ValueError, match="ddf"):
        save_overview(tmp_path / "o.png", image, image, image, torch.zeros(3, 5, 5, 5))
    with pytest.raises(ValueError, match="moving"):
        save_overview(tmp_path / "o.png", image, image[0], image, torch.zeros(3, *image.shape))
    with pytest.raises(ValueError, match="spacing"):
        save_overview(tmp_path / "o.png", image, image, image, torch.zeros(3, *image.shape), spacing=(1, 0, 1))
    assert not list(tmp_path.iterdir())
