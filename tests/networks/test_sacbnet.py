"""SACB-Net: the spatial-awareness convolution block against dense convolutions, the soft matching flow on known
shifts, the network's parameter count, batch independence, determinism, weights files and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_unireg.networks.blocks import SpatialAwareConvBlock, soft_matching_flow
from monai_unireg.networks.nets import SACBNet, load_sacbnet

SMALL = {"channels": (4, 4, 8, 8, 8), "num_clusters": 3}


def sac_by_dense_convolutions(block: SpatialAwareConvBlock, features: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-7 written out with one dense 3x3x3 convolution per cluster and the cluster masks (float64)."""
    projected = block.project(features)
    labels, centroids = block.cluster(projected)
    out = torch.zeros_like(features)
    for n in range(centroids.shape[1]):
        for b in range(features.shape[0]):
            modulation = torch.sigmoid(block.kernel_mlp(centroids[b, n]))
            kernel = (block.weight * modulation).view(*block.weight.shape[:2], 3, 3, 3)
            bias = block.bias_mlp(centroids[b, n])
            response = F.conv3d(projected[b : b + 1], kernel, bias, padding=1)
            mask = (labels[b] == n).view(1, 1, *features.shape[2:])
            out[b : b + 1] += response * mask
    return features + F.leaky_relu(out, 0.1)


@pytest.mark.parametrize("num_clusters", [1, 4])
def test_sacb_equals_one_dense_convolution_per_cluster(generator, num_clusters):
    torch.manual_seed(0)
    block = SpatialAwareConvBlock(3, num_clusters=num_clusters).double()
    features = torch.randn(2, 3, 6, 5, 7, generator=generator, dtype=torch.float64)
    labels, _ = block.cluster(block.project(features))
    assert labels.unique().numel() == num_clusters  # every cluster is used, so every kernel is checked
    torch.testing.assert_close(block(features), sac_by_dense_convolutions(block, features))


def test_sacb_clusters_on_patch_means_and_passes_gradients_to_every_parameter(generator):
    torch.manual_seed(0)
    block = SpatialAwareConvBlock(4, num_clusters=3)
    features = torch.randn(1, 4, 6, 6, 6, generator=generator, requires_grad=True)
    projected = block.project(features)
    _, centroids = block.cluster(projected)
    assert not centroids.requires_grad  # the clustering carries no gradient (authors' code)
    patches = F.pad(projected, (1,) * 6).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    patch_means = patches.mean((-3, -2, -1)).flatten(2).transpose(1, 2)  # Eq. 3 written out
    labels, _ = block.cluster(projected)
    distances = torch.cdist(patch_means.detach(), centroids)
    assert torch.equal(labels, distances.argmin(2))  # each voxel in the cluster of its nearest centroid
    block(features).square().mean().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("shift", [(1, 0, -1), (0, 0, 0), (-1, 1, 1)])
def test_soft_matching_flow_recovers_a_one_voxel_shift(generator, shift):
    """Moving features are the fixed ones moved by ``shift``: ``moving(x + shift) = fixed(x)`` inside."""
    fixed = F.normalize(torch.randn(1, 16, 9, 9, 9, generator=generator), dim=1) * 6  # self-match is the largest
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))  # moving[x + shift] = fixed[x]
    flow = soft_matching_flow(fixed, moving)
    inside = flow[..., 2:-2, 2:-2, 2:-2]
    expected = torch.tensor(shift, dtype=flow.dtype).view(1, 3, 1, 1, 1).expand_as(inside)
    torch.testing.assert_close(inside, expected, atol=1e-3, rtol=0)
    assert flow.abs().max() <= 1 + 1e-6  # a soft arg-max over {-1, 0, 1}^3


def test_published_parameter_count():
    count = sum(p.numel() for p in SACBNet().parameters())
    assert count == 1_105_591
    assert abs(count - 1.11e6) / 1.11e6 < 0.02  # paper Table 1: 1.11 M


def test_forward_shape_batch_independence_and_determinism(generator):
    torch.manual_seed(0)
    net = SACBNet(input_size=(32, 32, 48), **SMALL).eval()
    moving = torch.rand(2, 1, 32, 32, 48, generator=generator)
    fixed = torch.rand(2, 1, 32, 32, 48, generator=generator)
    with torch.no_grad():
        ddf = net(moving, fixed)
        again = net(moving, fixed)
        single = net(moving[1:], fixed[1:])
    assert ddf.shape == (2, 3, 32, 32, 48) and torch.isfinite(ddf).all()
    assert torch.equal(ddf, again)  # seeded K-Means: the same clusters every call
    torch.testing.assert_close(ddf[1:], single, atol=1e-4, rtol=1e-4)  # per-sample clusters and norms


def test_training_step_reaches_every_parameter(generator):
    torch.manual_seed(0)
    net = SACBNet(input_size=(32, 32, 32), **SMALL)
    moving, fixed = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    net(moving, fixed).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_weights_round_trip_and_bad_files(tmp_path, generator):
    torch.manual_seed(0)
    net = SACBNet(input_size=(32, 32, 32), **SMALL).eval()
    torch.save({"config": net.config, "model": net.state_dict()}, tmp_path / "model.pt")
    loaded = load_sacbnet(tmp_path / "model.pt").eval()
    assert loaded.config == net.config
    pair = torch.rand(2, 1, 1, 32, 32, 32, generator=generator)
    with torch.no_grad():
        assert torch.equal(loaded(*pair), net(*pair))
    torch.save({"config": net.config, "model": {"encoder.0.0.conv.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit SACBNet"):
        load_sacbnet(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_sacbnet(tmp_path / "junk.pt")


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SACBNet(input_size=(30, 32, 32)), "multiple of 16"),
        (lambda: SACBNet(channels=(8, 16, 32)), "5 values"),
        (lambda: SACBNet(num_clusters=(7, 7)), "num_clusters"),
        (lambda: SACBNet(num_clusters=0), "num_clusters"),
        (lambda: SpatialAwareConvBlock(4, kmeans_tolerance=-1.0), "kmeans_tolerance"),
    ],
)
def test_bad_configuration_is_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_input_is_refused(generator):
    net = SACBNet(input_size=(32, 32, 32), **SMALL)
    image = torch.rand(1, 1, 32, 32, 32, generator=generator)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 1, 32, 32, 40), torch.rand(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match="same shape"):
        net(image, torch.rand(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="in_channels"):
        net(torch.rand(1, 2, 32, 32, 32), torch.rand(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="NaN|finite"):
        net(image, image.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="4 channels"):
        SpatialAwareConvBlock(4)(torch.rand(1, 3, 4, 4, 4))


def test_pyramid_geometry_keeps_constant_and_linear_fields_and_translations(generator, monkeypatch):
    """One geometry, the average-pooled features': a field pooled down a level and upsampled back is unchanged
    (constant: everywhere; linear: away from the outer half voxel), and a translation found at 1/16 is that
    translation at full resolution (corner-aligned resizing scaled it by 2.11 per level at 1/16 of 64)."""
    from monai_unireg.networks.nets.sacbnet import PYRAMID_ALIGN_CORNERS
    from monai_unireg.spatial import identity_grid, resize_ddf

    fine = (32, 32, 32)
    constant = torch.tensor([1.5, -0.5, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, *fine)
    linear = constant + 0.05 * identity_grid(fine).unsqueeze(0)

    def round_trip(field: torch.Tensor) -> torch.Tensor:
        return resize_ddf(F.avg_pool3d(field, 2) / 2, fine, align_corners=PYRAMID_ALIGN_CORNERS)

    torch.testing.assert_close(round_trip(constant), constant, atol=1e-5, rtol=0)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(round_trip(linear)[inner], linear[inner], atol=1e-5, rtol=0)

    import monai_unireg.networks.nets.sacbnet as module

    translation = torch.tensor([0.5, -0.25, 0.75])

    def coarsest_moves_only(fixed, moving):
        level_translation = translation if fixed.shape[2] == 4 else torch.zeros(3)
        return level_translation.view(1, 3, 1, 1, 1).expand(fixed.shape[0], 3, *fixed.shape[2:]).clone()

    monkeypatch.setattr(module, "soft_matching_flow", coarsest_moves_only)
    torch.manual_seed(0)
    net = SACBNet(input_size=(64, 64, 64), **SMALL)
    with torch.no_grad():
        net.head[-1].weight.zero_()
    moving, fixed = torch.rand(2, 1, 1, 64, 64, 64, generator=generator)
    ddf = net(moving, fixed)
    expected = (translation * 16).view(1, 3, 1, 1, 1).expand_as(ddf)
    torch.testing.assert_close(ddf, expected, atol=1e-4, rtol=0)
