"""Tests of the Universal Model UNet feature extractor and its checkpoint loader.

The checkpoint layout below is an independent table written from the authors' code
(ljwztc/CLIP-Driven-Universal-Model: ``model/Unet.py``, ``model/Universal_model.py`` with ``backbone='unet'``,
``train.py`` saving ``{'net': DDP state_dict, 'optimizer': ..., 'scheduler': ..., 'epoch': ...}``), not derived
from the module under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monai_unireg.networks.nets import UniversalModelFeatures, load_universal_model_checkpoint

# LUConv blocks of the authors' UNet3D: (key prefix inside the backbone, in channels, out channels).
CONV_BLOCKS = [
    ("down_tr64.ops.0", 1, 32),
    ("down_tr64.ops.1", 32, 64),
    ("down_tr128.ops.0", 64, 64),
    ("down_tr128.ops.1", 64, 128),
    ("down_tr256.ops.0", 128, 128),
    ("down_tr256.ops.1", 128, 256),
    ("down_tr512.ops.0", 256, 256),
    ("down_tr512.ops.1", 256, 512),
    ("up_tr256.ops.0", 768, 256),
    ("up_tr256.ops.1", 256, 256),
    ("up_tr128.ops.0", 384, 128),
    ("up_tr128.ops.1", 128, 128),
    ("up_tr64.ops.0", 192, 64),
    ("up_tr64.ops.1", 64, 64),
]
# ConvTranspose3d(k=2, s=2) of the decoder: (key prefix, in channels, out channels); weight is [in, out, 2, 2, 2].
UP_CONVS = [("up_tr256.up_conv", 512, 512), ("up_tr128.up_conv", 256, 256), ("up_tr64.up_conv", 128, 128)]


def authors_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the used part of a DDP-trained Universal_model('unet') state dict."""
    table: dict[str, tuple[int, ...]] = {}
    for prefix, cin, cout in CONV_BLOCKS:
        key = f"module.backbone.{prefix}"
        table[f"{key}.conv1.weight"] = (cout, cin, 3, 3, 3)
        table[f"{key}.conv1.bias"] = (cout,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            table[f"{key}.bn1.{name}"] = (cout,)
        table[f"{key}.bn1.num_batches_tracked"] = ()
    for prefix, cin, cout in UP_CONVS:
        table[f"module.backbone.{prefix}.weight"] = (cin, cout, 2, 2, 2)
        table[f"module.backbone.{prefix}.bias"] = (cout,)
    table["module.precls_conv.0.weight"] = (64,)
    table["module.precls_conv.0.bias"] = (64,)
    table["module.precls_conv.2.weight"] = (8, 64, 1, 1, 1)
    table["module.precls_conv.2.bias"] = (8,)
    return table


# Parts of the Universal Model that the features do not use (word_embedding encoding, 32 classes).
IGNORED_LAYOUT = {
    "module.GAP.0.weight": (512,),
    "module.GAP.0.bias": (512,),
    "module.GAP.3.weight": (256, 512, 1, 1, 1),
    "module.GAP.3.bias": (256,),
    "module.controller.weight": (153, 512, 1, 1, 1),
    "module.controller.bias": (153,),
    "module.organ_embedding": (32, 512),
    "module.text_to_vision.weight": (256, 512),
    "module.text_to_vision.bias": (256,),
}


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes; variances positive, ``num_batches_tracked`` an integer count."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1234)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".conv1.weight") or key.endswith("up_conv.weight"):
            fan_in = shape[1] * 27 if key.endswith("conv1.weight") else shape[0] * 8
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1 + (1.0 if key.endswith("bn1.weight") else 0.0)
    return state


def save_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Save like the authors' ``train.py``: ``{'net': state, 'optimizer': ..., 'scheduler': ..., 'epoch': ...}``."""
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    scheduler = {"warmup_epochs": 100, "last_epoch": 50, "base_lrs": [1e-4]}
    torch.save({"net": state, "optimizer": optimizer, "scheduler": scheduler, "epoch": 50}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint_state() -> dict[str, torch.Tensor]:
    """A random state dict with the authors' used and ignored keys."""
    return random_state({**authors_layout(), **IGNORED_LAYOUT})


@pytest.fixture(scope="module")
def loaded(checkpoint_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory):
    """A ``UniversalModelFeatures`` in eval mode filled from the saved random checkpoint."""
    path = save_checkpoint(checkpoint_state, tmp_path_factory.mktemp("ckpt") / "unet.pth")
    return load_universal_model_checkpoint(UniversalModelFeatures().eval(), path)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Functional re-statement of the authors' UNet3D + precls_conv forward, reading their key names."""

    def block(prefix: str, h: torch.Tensor) -> torch.Tensor:
        key = f"module.backbone.{prefix}"
        h = F.conv3d(h, sd[f"{key}.conv1.weight"], sd[f"{key}.conv1.bias"], padding=1)
        h = F.batch_norm(
            h, None, None, sd[f"{key}.bn1.weight"], sd[f"{key}.bn1.bias"], training=True, momentum=0.1, eps=1e-5
        )
        return F.relu(h)

    def two(level: str, h: torch.Tensor) -> torch.Tensor:
        return block(f"{level}.ops.1", block(f"{level}.ops.0", h))

    def up(level: str, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        w, b = sd[f"module.backbone.{level}.up_conv.weight"], sd[f"module.backbone.{level}.up_conv.bias"]
        return two(level, torch.cat([F.conv_transpose3d(h, w, b, stride=2), skip], dim=1))

    s64 = two("down_tr64", x)
    s128 = two("down_tr128", F.max_pool3d(s64, 2))
    s256 = two("down_tr256", F.max_pool3d(s128, 2))
    h = two("down_tr512", F.max_pool3d(s256, 2))
    h = up("up_tr64", up("up_tr128", up("up_tr256", h, s256), s128), s64)
    h = F.relu(F.group_norm(h, 16, sd["module.precls_conv.0.weight"], sd["module.precls_conv.0.bias"]))
    return F.conv3d(h, sd["module.precls_conv.2.weight"], sd["module.precls_conv.2.bias"])


def test_layout_table_matches_module() -> None:
    """The independent table has 108 keys and the module has the same parameter count (19,074,248)."""
    table = authors_layout()
    assert len(table) == 108
    names = {k.removeprefix("module.").removeprefix("backbone.") for k in table}
    assert names == set(UniversalModelFeatures().state_dict())
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_params = sum(torch.Size(shape).numel() for key, shape in table.items() if not key.endswith(buffers))
    assert n_params == 19_074_248
    assert sum(p.numel() for p in UniversalModelFeatures().parameters()) == n_params


def test_every_tensor_lands_in_place(loaded: UniversalModelFeatures, checkpoint_state: dict) -> None:
    own = loaded.state_dict()
    for key in authors_layout():
        name = key.removeprefix("module.").removeprefix("backbone.")
        assert torch.equal(own[name], checkpoint_state[key]), key
    assert torch.equal(
        loaded.down_tr64.ops[0].conv1.weight, checkpoint_state["module.backbone.down_tr64.ops.0.conv1.weight"]
    )
    assert torch.equal(loaded.up_tr256.up_conv.weight, checkpoint_state["module.backbone.up_tr256.up_conv.weight"])
    assert torch.equal(loaded.precls_conv[2].weight, checkpoint_state["module.precls_conv.2.weight"])


def test_forward_matches_reference_and_shape(loaded: UniversalModelFeatures, checkpoint_state: dict) -> None:
    x = torch.rand(2, 1, 16, 8, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = loaded(x)
        expected = reference_forward(checkpoint_state, x)
    assert out.shape == (2, 8, 16, 8, 24)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_output_shape_32_cubed(loaded: UniversalModelFeatures) -> None:
    with torch.no_grad():
        out = loaded(torch.rand(2, 1, 32, 32, 32))
    assert out.shape == (2, 8, 32, 32, 32)
    assert torch.isfinite(out).all()


def test_batch_statistics_in_eval_mode(loaded: UniversalModelFeatures) -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 1, 8, 8, 16, generator=g), 3.0 * torch.rand(1, 1, 8, 8, 16, generator=g)
    buffers = {k: v.clone() for k, v in loaded.state_dict().items() if "running" in k}
    assert not loaded.training and loaded.batch_statistics
    with torch.no_grad():
        alone = loaded(torch.cat([a, a]))[0]
        mixed = loaded(torch.cat([a, b]))[0]
        assert not torch.allclose(alone, mixed, atol=1e-3)
        loaded.batch_statistics = False
        try:
            alone = loaded(torch.cat([a, a]))[0]
            mixed = loaded(torch.cat([a, b]))[0]
        finally:
            loaded.batch_statistics = True
    torch.testing.assert_close(alone, mixed, rtol=1e-5, atol=1e-5)
    for k, v in loaded.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), f"{k} changed in an eval forward"


def test_batch_statistics_constructor_flag() -> None:
    assert not UniversalModelFeatures(batch_statistics=False).batch_statistics
    with pytest.raises(ValueError, match="batch_statistics"):
        UniversalModelFeatures(batch_statistics=1)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 16, 16, 16), "image must be a batched"),
        ((1, 2, 16, 16, 16), "1 channel"),
        ((1, 1, 16, 12, 16), "multiple of 8"),
        ((1, 1, 8, 8, 8), "bottleneck"),
    ],
)
def test_bad_input(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UniversalModelFeatures().eval()(torch.zeros(shape))


def test_wrappings_and_layouts(checkpoint_state: dict, tmp_path: Path) -> None:
    used = {k: v for k, v in checkpoint_state.items() if k in authors_layout()}
    plain = {k.removeprefix("module."): v for k, v in used.items()}
    voxelopt = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in used.items()}
    for name, obj in [("plain", plain), ("state_dict", {"state_dict": used}), ("voxelopt", voxelopt)]:
        torch.save(obj, tmp_path / f"{name}.pth")
        model = load_universal_model_checkpoint(UniversalModelFeatures(), tmp_path / f"{name}.pth")
        assert torch.equal(model.up_tr64.ops[1].bn1.running_var, used["module.backbone.up_tr64.ops.1.bn1.running_var"])


def test_num_batches_tracked_optional(checkpoint_state: dict, tmp_path: Path) -> None:
    state = {k: v for k, v in checkpoint_state.items() if not k.endswith("num_batches_tracked")}
    load_universal_model_checkpoint(UniversalModelFeatures(), save_checkpoint(state, tmp_path / "c.pth"))


def test_missing_key(checkpoint_state: dict, tmp_path: Path) -> None:
    state = dict(checkpoint_state)
    del state["module.backbone.up_tr128.ops.0.bn1.running_mean"]
    del state["module.precls_conv.2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: precls_conv\.2\.bias, up_tr128\.ops\.0\.bn1\.running_mean"):
        load_universal_model_checkpoint(UniversalModelFeatures(), save_checkpoint(state, tmp_path / "c.pth"))


def test_wrong_shape(checkpoint_state: dict, tmp_path: Path) -> None:
    state = dict(checkpoint_state)
    state["module.precls_conv.2.weight"] = torch.zeros(14, 64, 1, 1, 1)
    with pytest.raises(ValueError, match=r"precls_conv\.2\.weight \(checkpoint \(14, 64, 1, 1, 1\)"):
        load_universal_model_checkpoint(UniversalModelFeatures(), save_checkpoint(state, tmp_path / "c.pth"))


def test_unexpected_key_under_our_modules(checkpoint_state: dict, tmp_path: Path) -> None:
    state = dict(checkpoint_state)
    state["module.backbone.down_tr64.ops.0.activation.weight"] = torch.zeros(32)
    with pytest.raises(ValueError, match=r"unexpected keys: down_tr64\.ops\.0\.activation\.weight"):
        load_universal_model_checkpoint(UniversalModelFeatures(), save_checkpoint(state, tmp_path / "c.pth"))


def test_failed_load_leaves_module_unchanged(checkpoint_state: dict, tmp_path: Path) -> None:
    model = UniversalModelFeatures()
    before = model.precls_conv[0].weight.clone()
    state = dict(checkpoint_state)
    del state["module.backbone.down_tr64.ops.0.conv1.weight"]
    with pytest.raises(ValueError):
        load_universal_model_checkpoint(model, save_checkpoint(state, tmp_path / "c.pth"))
    assert torch.equal(model.precls_conv[0].weight, before)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match="nope.pth"):
        load_universal_model_checkpoint(UniversalModelFeatures(), missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_universal_model_checkpoint(UniversalModelFeatures(), garbage)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="list.pth"):
        load_universal_model_checkpoint(UniversalModelFeatures(), listing)
    with pytest.raises(ValueError, match="module"):
        load_universal_model_checkpoint(torch.nn.Conv3d(1, 1, 1), listing)
