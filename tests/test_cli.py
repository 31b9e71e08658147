"""The monai-unireg command line end to end: outputs, physical space, the demo, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_unireg import io
from monai_unireg.cli import main
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.metrics import LabelDiceMetric

OUTPUTS = {"warped.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "metrics.json", "overview.png"}


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    pair = make_synthetic_pair(shape=(32, 36, 32), spacing=3.0, max_displacement=2.0, seed=1)
    return pair, pair.save(folder)


def register_arguments(paths, out, *extra):
    return [
        "register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
        "--fixed-label", str(paths["fixed_label"]), "--moving-label", str(paths["moving_label"]),
        "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_register_writes_every_output(small_pair, tmp_path, capsys):
    pair, paths = small_pair
    assert main(register_arguments(paths, tmp_path / "out")) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    printed = capsys.readouterr().out
    assert "[1/4]" in printed and "[4/4]" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dice"]) == {"1", "2", "3", "4"} and set(metrics["hd95_mm"]) == set(metrics["dice"])
    before = make_dice_before(pair)
    assert metrics["dice_mean"] > before
    assert metrics["folding_percent"] < 1.0 and metrics["runtime_s"] > 0 and metrics["modality"] == "mri"
    field = nib.load(str(out / "ddf.nii.gz"))
    assert field.shape == (32, 36, 32, 1, 3) and np.allclose(field.affine, pair.affine, atol=1e-5)
    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    assert set(np.unique(warped_label)) <= {0, 1, 2, 3, 4}
    assert (out / "overview.png").read_bytes()[:4] == b"\x89PNG"


def make_dice_before(pair) -> float:
    return float(LabelDiceMetric()(pair.moving_label, pair.fixed_label).nanmean())


def test_moving_on_another_grid_is_brought_into_the_fixed_grid(small_pair, tmp_path):
    """The same moving image stored with flipped, permuted axes (and the matching affine) gives the same result."""
    pair, paths = small_pair
    moving = np.asarray(nib.load(str(paths["moving"])).dataobj)
    moving_label = np.asarray(nib.load(str(paths["moving_label"])).dataobj)
    to_old = np.array([[0, -1.0, 0, 31], [0, 0, -1.0, 35], [1.0, 0, 0, 0], [0, 0, 0, 1]])  # new (k, i', j')
    affine = pair.affine @ to_old
    reoriented = {
        **paths,
        "moving": tmp_path / "moving_lps.nii.gz",
        "moving_label": tmp_path / "moving_label_lps.nii.gz",
    }
    io.save_nifti(np.flip(moving, (0, 1)).transpose(2, 0, 1), affine, reoriented["moving"])
    io.save_nifti(np.flip(moving_label, (0, 1)).transpose(2, 0, 1), affine, reoriented["moving_label"])
    assert main(register_arguments(paths, tmp_path / "a")) == 0
    assert main(register_arguments(reoriented, tmp_path / "b")) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert second["moving_resampled_to_fixed_grid"] and not first["moving_resampled_to_fixed_grid"]
    assert second["dice"] == pytest.approx(first["dice"], abs=1e-4)
    field_a, _ = io.load_ddf(tmp_path / "a" / "ddf.nii.gz")
    field_b, _ = io.load_ddf(tmp_path / "b" / "ddf.nii.gz")
    # the same field up to the resampling's float rounding (~1e-7 of the intensities), which the refinement's 130
    # Adam steps carry into the field: a few hundredths of a mm at the worst voxels (border), far less on average
    difference = (field_b - field_a).abs()
    assert float(difference.mean()) < 1e-3 and float(difference.max()) < 0.05, (difference.mean(), difference.max())


def test_python_module_entry_point_and_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "monai_unireg", "demo", "--out", str(tmp_path / "demo"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert OUTPUTS <= {p.name for p in (tmp_path / "demo").iterdir()}
    assert "endpoint error" in result.stdout
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["dice_mean"] > 0.92  # 0.90 before registration


def write_bad(tmp_path, name, array, affine=np.eye(4)):
    path = tmp_path / name
    io.save_nifti(array, affine, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, t: {"fixed": t / "missing.nii.gz"}, "fixed"),
        (lambda p, t: {"moving": (t / "junk.nii.gz").write_bytes(b"junk") and t / "junk.nii.gz"}, "moving"),
        (lambda p, t: {"fixed": write_bad(t, "nan.nii.gz", np.full((32, 36, 32), np.nan, np.float32))}, "NaN"),
        (lambda p, t: {"fixed": write_bad(t, "2d.nii.gz", np.zeros((32, 36), np.float32))}, "3D"),
        (lambda p, t: {"moving_label": write_bad(t, "frac.nii.gz", np.full((32, 36, 32), 0.5, np.float32))}, "integer"),
        (lambda p, t: {"fixed_label": write_bad(t, "empty.nii.gz", np.zeros((32, 36, 32), np.int16))}, "empty"),
        (lambda p, t: {"fixed_label": write_bad(t, "small.nii.gz", np.ones((8, 8, 8), np.int16))}, "fixed_label"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message_and_no_output(small_pair, tmp_path, capsys, change, message):
    pair, paths = small_pair
    paths = {**paths, **change(paths, tmp_path)}
    out = tmp_path / "out"
    assert main(register_arguments(paths, out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_method_and_out_on_a_file(small_pair, tmp_path, capsys):
    _, paths = small_pair
    assert main(register_arguments(paths, tmp_path / "out", "--method", "magic")) == 2
    assert "magic" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(register_arguments(paths, blocker)) == 2
    assert "--out" in capsys.readouterr().err and blocker.read_text() == "x"


def test_itk_applies_the_written_field_to_the_original_moving_file(small_pair, tmp_path):
    """SimpleITK resampling the re-oriented moving file through ddf.nii.gz reproduces warped.nii.gz."""
    sitk = pytest.importorskip("SimpleITK")
    pair, paths = small_pair
    moving = np.asarray(nib.load(str(paths["moving"])).dataobj)
    to_old = np.array([[0, -1.0, 0, 31], [0, 0, -1.0, 35], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    io.save_nifti(np.flip(moving, (0, 1)).transpose(2, 0, 1), pair.affine @ to_old, tmp_path / "moving_lps.nii.gz")
    arguments = ["register", "--fixed", str(paths["fixed"]), "--moving", str(tmp_path / "moving_lps.nii.gz")]
    assert main([*arguments, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    fixed_itk = sitk.ReadImage(str(paths["fixed"]), sitk.sitkFloat64)
    moving_itk = sitk.ReadImage(str(tmp_path / "moving_lps.nii.gz"), sitk.sitkFloat64)
    field = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    )
    by_itk = sitk.GetArrayFromImage(sitk.Resample(moving_itk, fixed_itk, field, sitk.sitkLinear, 0.0)).transpose(
        2, 1, 0
    )
    ours = np.asarray(nib.load(str(tmp_path / "out" / "warped.nii.gz")).dataobj)
    inner = (slice(3, -3),) * 3
    assert np.abs(by_itk[inner] - ours[inner]).mean() < 1e-3
    assert np.abs(by_itk[inner] - ours[inner]).max() < 0.05


def test_unigradicon_method_with_a_checkpoint_and_instance_optimisation(small_pair, tmp_path, capsys):
    """A small network saved as training saves it (``{"config", "model"}``): the CLI rebuilds it from the file."""
    from monai_unireg.networks.nets import UniGradICON

    _, paths = small_pair
    torch.manual_seed(0)
    network = UniGradICON(input_size=32, down_channels=(4, 8, 8), up_channels=(4, 8, 8))
    for unet in network.unets:
        torch.nn.init.normal_(unet.lastConv.weight, std=1e-3)
    weights = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, weights)
    out = tmp_path / "out"
    extra = ("--method", "unigradicon", "--weights", str(weights), "--io-iterations", "2")
    assert main(register_arguments(paths, out, *extra)) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert "instance optimisation 2/2" in capsys.readouterr().out
    field = nib.load(str(out / "ddf.nii.gz"))
    assert field.shape == (32, 36, 32, 1, 3) and np.abs(np.asarray(field.dataobj)).max() > 0

    assert main(register_arguments(paths, tmp_path / "no_weights", "--method", "unigradicon")) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(register_arguments(paths, tmp_path / "voxelopt", "--weights", str(weights))) == 2
    assert "--weights does nothing for --method voxelopt" in capsys.readouterr().err


def test_sacbnet_method_runs_a_checkpoint_at_its_training_size(small_pair, tmp_path, capsys):
    """The 32x36x32 pair is resized to the network's 32^3 (multiples of 16) and the field brought back."""
    from monai_unireg.networks.nets import SACBNet

    _, paths = small_pair
    torch.manual_seed(0)
    network = SACBNet(input_size=(32, 32, 32), channels=(4, 4, 8, 8, 8), num_clusters=3)
    weights = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, weights)
    out = tmp_path / "out"
    assert main(register_arguments(paths, out, "--method", "sacbnet", "--weights", str(weights))) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    field = nib.load(str(out / "ddf.nii.gz"))
    assert field.shape == (32, 36, 32, 1, 3) and np.abs(np.asarray(field.dataobj)).max() > 0

    assert main(register_arguments(paths, tmp_path / "no_weights", "--method", "sacbnet")) == 2
    assert "--weights" in capsys.readouterr().err
    extra = ("--method", "sacbnet", "--weights", str(weights), "--io-iterations", "2")
    assert main(register_arguments(paths, tmp_path / "io", *extra)) == 2
    assert "--io-iterations does nothing for --method sacbnet" in capsys.readouterr().err


def test_promptreg_method_runs_a_checkpoint_at_its_training_size(small_pair, tmp_path, capsys):
    """The 32x36x32 pair is resized to the network's 32^3 (multiples of 8) and the field brought back."""
    from monai_unireg.engines import METHOD_DEFAULTS
    from monai_unireg.networks.nets import PromptReg

    _, paths = small_pair
    torch.manual_seed(0)
    network = PromptReg(input_size=(32, 32, 32), num_domains=2, channels=2)
    weights = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, weights)
    out = tmp_path / "out"
    assert main(register_arguments(paths, out, "--method", "promptreg", "--weights", str(weights))) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    field = nib.load(str(out / "ddf.nii.gz"))
    assert field.shape == (32, 36, 32, 1, 3) and np.abs(np.asarray(field.dataobj)).max() > 0
    assert METHOD_DEFAULTS["promptreg"].ct_window == (-1000.0, 1000.0)  # paper Sec. 3.1

    assert main(register_arguments(paths, tmp_path / "no_weights", "--method", "promptreg")) == 2
    assert "--weights" in capsys.readouterr().err
    extra = ("--method", "promptreg", "--weights", str(weights), "--io-iterations", "2")
    assert main(register_arguments(paths, tmp_path / "io", *extra)) == 2
    assert "--io-iterations does nothing for --method promptreg" in capsys.readouterr().err


def test_unireg_method_with_a_condition_and_instance_optimisation(small_pair, tmp_path, capsys):
    """A 32^3 UniReg saved as training saves it runs with --task and --reg-type on [-1, 1] images (paper Sec. 4.3)."""
    from monai_unireg.engines import METHOD_DEFAULTS
    from monai_unireg.networks.nets import UniReg

    _, paths = small_pair
    torch.manual_seed(0)
    network = UniReg(input_size=(32, 32, 32), channels=(4, 8, 8, 8))
    weights = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, weights)
    inputs = []
    record = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: inputs.append(args[0]) if isinstance(module, UniReg) else None
    )
    out = tmp_path / "out"
    extra = ("--method", "unireg", "--weights", str(weights), "--task", "abdomen", "--reg-type", "inter")
    try:
        assert main(register_arguments(paths, out, *extra, "--io-iterations", "2")) == 0
    finally:
        record.remove()
    assert {p.name for p in out.iterdir()} == OUTPUTS
    printed = capsys.readouterr().out
    assert "UniReg condition: task abdomen, inter-subject; instance optimisation: 2 steps" in printed
    assert "instance optimisation 2/2" in printed
    field = nib.load(str(out / "ddf.nii.gz"))
    assert field.shape == (32, 36, 32, 1, 3) and np.abs(np.asarray(field.dataobj)).max() > 0
    assert inputs[0].shape == (1, 1, 32, 32, 32) and float(inputs[0].min()) == pytest.approx(-1.0)
    assert METHOD_DEFAULTS["unireg"].ct_window == (-800.0, 400.0)
    assert METHOD_DEFAULTS["unireg"].intensity_range == (-1.0, 1.0)


def test_unireg_method_defaults_aliases_and_refusals(small_pair, tmp_path, capsys):
    """Without --task / --reg-type: brain, inter; unseen anatomy gets its nearest region; bad input writes nothing."""
    from monai_unireg.cli import METHODS
    from monai_unireg.networks.nets import UniReg

    _, paths = small_pair
    network = UniReg(input_size=(32, 32, 32), channels=(4, 8, 8, 8))
    weights = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, weights)
    default = METHODS["unireg"]((32, 36, 32), weights)
    assert (default.network.task, default.network.reg_type) == ("brain", "inter")
    unseen = METHODS["unireg"]((32, 36, 32), weights, task="lung", reg_type="intra")
    assert unseen.network.network.tasks[unseen.network.network.resolve_task(unseen.network.task)] == "chest"
    capsys.readouterr()

    def refused(*extra: str) -> str:
        out = tmp_path / "refused"
        assert main(register_arguments(paths, out, *extra)) == 2
        assert not out.exists() or not any(out.iterdir())
        return capsys.readouterr().err

    assert "--method unireg needs --weights PATH" in refused("--method", "unireg")
    assert "unknown task 'elbow'" in refused("--method", "unireg", "--weights", str(weights), "--task", "elbow")
    assert "--task does nothing for --method voxelopt; it applies to --method unireg" in refused("--task", "abdomen")
    assert "--reg-type does nothing for --method promptreg" in refused(
        "--method", "promptreg", "--weights", str(weights), "--reg-type", "intra"
    )
    assert "sideways" in refused("--method", "unireg", "--reg-type", "sideways")


def test_light_constants_agree_with_the_method_modules():
    """The command line keeps copies of a few names so that --help needs no torch; they must agree."""
    from monai_unireg import cli
    from monai_unireg.engines import MODALITIES
    from monai_unireg.engines.unireg import DEFAULT_REG_TYPE, DEFAULT_TASK
    from monai_unireg.networks.nets import REGISTRATION_TYPES

    assert cli.MODALITIES == MODALITIES and cli.REGISTRATION_TYPES == REGISTRATION_TYPES
    assert (cli.DEFAULT_TASK, cli.DEFAULT_REG_TYPE) == (DEFAULT_TASK, DEFAULT_REG_TYPE)
    assert set(cli.METHOD_OPTIONS) == set(cli.METHODS)


def test_headline_dice_names_its_labels_and_the_value_before(small_pair, tmp_path, capsys):
    _, paths = small_pair
    out = tmp_path / "out"
    assert main(register_arguments(paths, out, "--labels", "1", "3")) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice_labels"] == [1, 3] and set(metrics["dice"]) == {"1", "3"}
    assert metrics["dice_labels_chosen"] == "the 2 labels given (--labels)"
    assert metrics["dice_mean_before"] < metrics["dice_mean"]
    before = f"(before {metrics['dice_mean_before']:.4f}) over the 2 labels given (--labels)"
    assert f"mean Dice {metrics['dice_mean']:.4f} {before}" in printed
    assert "done in" in printed and "registering" in printed and set(metrics["timing_s"]) >= {"reading", "writing"}
    assert main(register_arguments(paths, tmp_path / "all", "--no-overview")) == 0
    assert "over all 4 labels present in both maps" in capsys.readouterr().out


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise(capsys):
    import io as text_io

    from monai_unireg.cli import _LevelProgress

    class Terminal(text_io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = _LevelProgress(terminal)
    for done in (1, 2, 3):
        bar(done, 3)
    shown = terminal.getvalue()
    assert shown.count("\r") == 3 and "level 3/3" in shown and shown.endswith("\n") and shown.count("\n") == 1
    plain = _LevelProgress(text_io.StringIO())
    plain(1, 2)
    plain(2, 2)
    printed = capsys.readouterr().out
    assert "level 1/2 done" in printed and "level 2/2 done" in printed


def test_label_resampling_costs_about_what_the_image_costs(tmp_path):
    """A moving label map with 200 labels on another grid: one nearest-neighbour sampling, not one per label."""
    import time

    from monai_unireg.engines.pair_registration import read_pair

    rng = np.random.default_rng(0)
    shape = (64, 64, 64)
    image = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, 200, shape).astype(np.int16)
    rotation = np.array([[0.98, -0.17, 0, 2.0], [0.17, 0.98, 0, -3.0], [0, 0, 1.0, 1.5], [0, 0, 0, 1]])
    io.save_nifti(image, np.eye(4), tmp_path / "fixed.nii.gz")
    io.save_nifti(labels, np.eye(4), tmp_path / "fixed_label.nii.gz")
    io.save_nifti(image, rotation, tmp_path / "moving.nii.gz")
    io.save_nifti(labels, rotation, tmp_path / "moving_label.nii.gz")
    paths = [tmp_path / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_label", "moving_label")]
    start = time.perf_counter()
    read_pair(*paths[:2])
    images_only = time.perf_counter() - start
    start = time.perf_counter()
    pair = read_pair(*paths)
    with_labels = time.perf_counter() - start
    assert pair.moving_resampled and set(torch.unique(pair.moving_label).tolist()) <= set(range(200))
    assert with_labels < 4 * images_only + 1.0, (with_labels, images_only)


def test_default_is_voxelopt_with_refinement_and_no_refinement_gives_the_paper_method(capsys):
    """``register``'s default is VoxelOpt + our refinement; ``--no-refinement`` is VoxelOpt alone, voxelopt only."""
    from monai_unireg.cli import METHODS
    from monai_unireg.engines.refinement import Downsampled, RefinedRegistration
    from monai_unireg.networks.nets import VoxelOpt

    refined = METHODS["voxelopt"]((48, 48, 48))
    assert isinstance(refined, RefinedRegistration) and isinstance(refined.initial, Downsampled)
    # VoxelOpt on the pair at half resolution, the refinement adds the detail
    assert refined.initial.factor == 2 and isinstance(refined.initial.network, VoxelOpt)
    plain = METHODS["voxelopt"]((48, 48, 48), refinement=False)
    assert isinstance(plain, VoxelOpt) and plain.finest_level == 0
    arguments = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o", "--no-refinement"]
    assert main([*arguments, "--method", "sacbnet", "--weights", "w.pt"]) == 2
    assert "--no-refinement" in capsys.readouterr().err


@pytest.mark.parametrize("running, threads, expected", [("1/200", "2", None), ("3/200", "2", "PASSIVE"),
                                                         ("2/200", "1", None), ("oops", "2", "PASSIVE")])  # fmt: skip
def test_openmp_threads_spin_only_on_free_cores(monkeypatch, running, threads, expected):
    """Passive waiting when other processes keep running beside our threads (or when that cannot be read); a
    user's own OMP_WAIT_POLICY is kept."""
    import io as text_io

    import monai_unireg.cli as cli

    monkeypatch.setattr(
        cli, "open", lambda *a, **k: text_io.StringIO(f"0.50 0.40 0.30 {running} 4242\n"), raising=False
    )
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    cli._choose_openmp_wait_policy()
    assert cli.os.environ.get("OMP_WAIT_POLICY") == expected
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._choose_openmp_wait_policy()
    assert cli.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
