"""uniGradICON network and published-weights loader: architecture counts, identity start, the cascade's
composition against affine maps (exact under trilinear interpolation), the key layout, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.networks.nets import GradICONUNet, UniGradICON, load_unigradicon_weights, published_key_prefixes

SMALL = {"down_channels": (4, 8, 8), "up_channels": (4, 8, 8)}

PUBLISHED_DOWN = (2, 16, 32, 64, 256, 512)
PUBLISHED_UP_OUT = (16, 32, 64, 128, 256)


def published_unet_shapes() -> dict[str, tuple[int, ...]]:
    """The 47 tensors of one published UNet, written out from the reference architecture (METHODS.md)."""
    up_in = [PUBLISHED_DOWN[k + 1] + (PUBLISHED_UP_OUT[k + 1] if k < 4 else 0) for k in range(5)]
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(5):
        shapes[f"downConvs.{k}.weight"] = (PUBLISHED_DOWN[k + 1], PUBLISHED_DOWN[k], 3, 3, 3)
        shapes[f"downConvs.{k}.bias"] = (PUBLISHED_DOWN[k + 1],)
        shapes[f"upConvs.{k}.weight"] = (up_in[k], PUBLISHED_UP_OUT[k], 4, 4, 4)
        shapes[f"upConvs.{k}.bias"] = (PUBLISHED_UP_OUT[k],)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"batchNorms.{k}.{name}"] = (PUBLISHED_UP_OUT[k],)
        shapes[f"batchNorms.{k}.num_batches_tracked"] = ()
    shapes["lastConv.weight"] = (3, 18, 3, 3, 3)
    shapes["lastConv.bias"] = (3,)
    return shapes


def test_published_parameter_counts():
    unet = GradICONUNet()
    assert sum(p.numel() for p in unet.parameters()) == 17_670_229
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == published_unet_shapes()
    assert sum(p.numel() for p in UniGradICON().parameters()) == 70_680_916
    assert len(UniGradICON(include_step2=False).unets) == 3


def test_new_network_is_the_identity_map_at_any_size_and_batch(generator):
    net = UniGradICON(input_size=32, **SMALL)
    moving, fixed = torch.rand(3, 1, 20, 36, 28, generator=generator), torch.rand(3, 1, 20, 36, 28, generator=generator)
    ddf = net(moving, fixed)
    assert ddf.shape == (3, 3, 20, 36, 28)
    assert ddf.abs().max() == 0


class AffineStep(nn.Module):
    """Stands in for a UNet: the displacement ``A (x - 1/2)`` in normalised [0, 1] units, whatever the images."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = matrix
        self.seen_moving: list[torch.Tensor] = []

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        self.seen_moving.append(moving)
        grid = spatial.identity_grid(moving.shape[2:], dtype=torch.float64)
        unit = grid / torch.tensor([s - 1 for s in moving.shape[2:]], dtype=torch.float64).view(3, 1, 1, 1)
        centred = unit - 0.5
        return torch.einsum("ij,j...->i...", self.matrix, centred)[None].expand(moving.shape[0], -1, -1, -1, -1)


def test_cascade_composes_the_steps_in_the_reference_order(generator):
    """Affine steps compose exactly under trilinear interpolation: the cascade's map must be
    ``phi_1 o phi_2 o phi_3 o phi_4`` (the first, coarsest step applied last), each ``phi_k(x) = x + A_k (x - c)``."""
    net = UniGradICON(input_size=(33, 41, 37), **SMALL).double()
    matrices = [0.05 * torch.randn(3, 3, generator=generator, dtype=torch.float64) for _ in range(4)]
    net.unets = nn.ModuleList(AffineStep(m) for m in matrices)
    image = torch.rand(1, 1, 33, 41, 37, generator=generator, dtype=torch.float64)
    ddf = net(image, image)

    points = spatial.identity_grid((33, 41, 37), dtype=torch.float64)
    unit = points / torch.tensor([32.0, 40.0, 36.0], dtype=torch.float64).view(3, 1, 1, 1)
    mapped = unit
    for matrix in reversed(matrices):  # x -> phi_4(x) first, phi_1 last
        mapped = mapped + torch.einsum("ij,j...->i...", matrix, mapped - 0.5)
    expected = (mapped - unit) * torch.tensor([32.0, 40.0, 36.0], dtype=torch.float64).view(3, 1, 1, 1)
    inside = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # border padding bends the map at the edges
    torch.testing.assert_close(ddf[0][inside], expected[inside], atol=1e-9, rtol=0)

    # the 1/4 and 1/2 steps see average-pooled images (ceil mode); the second step the moving image warped by the first
    assert [tuple(step.seen_moving[0].shape[2:]) for step in net.unets] == [(9, 11, 10), (17, 21, 19), (33, 41, 37)] + [
        (33, 41, 37)
    ]
    half = nn.functional.avg_pool3d(image, 2, ceil_mode=True)
    first_on_half = spatial.compose(
        _voxels(net.unets[0], (9, 11, 10)), torch.zeros(1, 3, 17, 21, 19, dtype=torch.float64)
    )
    torch.testing.assert_close(net.unets[1].seen_moving[0], spatial.warp(half, first_on_half))


def _voxels(step: AffineStep, shape: tuple[int, ...]) -> torch.Tensor:
    field = step(torch.zeros(1, 1, *shape, dtype=torch.float64), None)
    return field * torch.tensor([s - 1 for s in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)


def test_gradients_reach_every_unet(generator):
    net = UniGradICON(input_size=32, **SMALL)
    for unet in net.unets:
        nn.init.normal_(unet.lastConv.weight, std=1e-3)
    moving, fixed = torch.rand(2, 1, 32, 32, 32, generator=generator), torch.rand(2, 1, 32, 32, 32, generator=generator)
    (spatial.warp(moving, net(moving, fixed)) - fixed).square().mean().backward()
    assert all(unet.downConvs[0].weight.grad.abs().sum() > 0 for unet in net.unets)


def test_published_layout_loads_every_tensor_in_place(tmp_path, generator):
    """A state dict with the released file's exact keys and shapes (random values) lands tensor by tensor."""
    shapes = published_unet_shapes()
    state = {}
    for prefix in published_key_prefixes(4):
        for name, shape in shapes.items():
            state[prefix + name] = (
                torch.randint(0, 1000, shape, generator=generator)
                if name.endswith("num_batches_tracked")
                else torch.randn(shape, generator=generator)
            )
    assert len(state) == 4 * 47
    path = tmp_path / "Step_2_final.trch"
    torch.save(state, path)
    net = load_unigradicon_weights(UniGradICON(), path)
    loaded = net.state_dict()
    for step, prefix in enumerate(published_key_prefixes(4)):
        for name in shapes:
            assert torch.equal(loaded[f"unets.{step}.{name}"], state[prefix + name]), (step, name)
    assert net.unets[0].downConvs[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_own_checkpoint_and_stage_one_layout_load(tmp_path, generator):
    source = UniGradICON(input_size=32, include_step2=False, **SMALL)
    for p in source.parameters():
        p.data.normal_(generator=generator)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    target = load_unigradicon_weights(
        UniGradICON(input_size=32, include_step2=False, **SMALL), tmp_path / "checkpoint.pt"
    )
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    renamed = {
        prefix + key.split(".", 2)[2]: value
        for prefix, step in zip(published_key_prefixes(3), range(3))
        for key, value in source.state_dict().items()
        if key.startswith(f"unets.{step}.")
    }
    torch.save(renamed, tmp_path / "stage1.trch")
    again = load_unigradicon_weights(UniGradICON(input_size=32, include_step2=False, **SMALL), tmp_path / "stage1.trch")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a torch file", "is not a PyTorch weights file"),
        ({"netPhi.other.weight": torch.zeros(1)}, "outside the 4-step"),
        ({"unets.0.lastConv.bias": torch.zeros(5)}, "does not fit"),
        ({"model": {"unets.0.lastConv.bias": "text"}}, "state dict of tensors"),
    ],
)
def test_bad_weight_files_are_refused(tmp_path, content, message):
    path = tmp_path / "weights.trch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_unigradicon_weights(UniGradICON(input_size=65), path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: UniGradICON(input_size=64), "too small"),
        (lambda: UniGradICON(input_size=(80, 80)), "input_size"),
        (lambda: GradICONUNet((4, 8), (4,)), "equal length"),
        (lambda: GradICONUNet(spatial_dims=1), "spatial_dims"),
    ],
)
def test_bad_configuration_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_input_is_refused(generator):
    net = UniGradICON(input_size=32, **SMALL)
    image = torch.rand(1, 1, 32, 32, 32, generator=generator)
    with pytest.raises(ValueError, match="same shape"):
        net(image, image[..., :-1])
    with pytest.raises(ValueError, match="moving"):
        net(image[0], image)
    with pytest.raises(ValueError, match="fixed"):
        net(image, image.clone().fill_(float("nan")))


@pytest.mark.parametrize("shape", [(19, 22, 17), (23, 18)])
def test_inference_path_matches_the_batch_norm_module(generator, shape):
    """Without autograd, evaluation normalises in place after cropping and splits the last convolution between the
    decoded and the skip channels; it must equal the BatchNorm module and concatenation path (odd and even sizes)."""
    unet = GradICONUNet(**SMALL, spatial_dims=len(shape)).eval()
    for parameter in unet.parameters():
        parameter.data.normal_(std=0.2, generator=generator)
    for norm in unet.batchNorms:
        norm.running_mean.normal_(std=0.3, generator=generator)
        norm.running_var.uniform_(0.5, 1.5, generator=generator)
    moving, fixed = torch.rand(2, 1, *shape, generator=generator), torch.rand(2, 1, *shape, generator=generator)
    with torch.no_grad():
        fast = unet(moving, fixed)
    reference = unet(moving, fixed)  # autograd on: the BatchNorm module path
    assert fast.abs().max() > 0
    torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=1e-5)
