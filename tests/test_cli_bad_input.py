"""Bad input to the command line, by class: every failure a user can cause ends in one line naming the option or file
with exit status 2 (a traceback only with --debug); options are checked before any file is read; outputs respect
the umask, a rerun replaces the earlier run's files, and no temporary survives an interrupted run.

The cases are our own (small synthetic NIfTI files written with nibabel), not the independent battery's.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_unireg import io
from monai_unireg.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 32^3 pair of shifted boxes with labels 1-3 (labels 1, 2 in both maps, 3 only in the moving one)."""
    folder = tmp_path_factory.mktemp("inputs")
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    fixed_label = np.zeros(SHAPE, np.int16)
    fixed_label[8:20, 8:22, 10:22] = 1
    fixed_label[12:16, 12:18, 14:18] = 2
    moving_label = np.roll(fixed_label, 2, axis=0)
    moving_label[24:28, 24:28, 24:28] = 3
    rng = np.random.default_rng(0)
    fixed = (fixed_label * 0.4 + 0.02 * rng.standard_normal(SHAPE) + 0.001 * grid[0]).astype(np.float32)
    moving = (moving_label * 0.4 + 0.02 * rng.standard_normal(SHAPE) + 0.001 * grid[0]).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return {
        "fixed": write_nifti(folder / "fixed.nii.gz", fixed, affine),
        "moving": write_nifti(folder / "moving.nii.gz", moving, affine),
        "fixed_label": write_nifti(folder / "fixed_label.nii.gz", fixed_label, affine),
        "moving_label": write_nifti(folder / "moving_label.nii.gz", moving_label, affine),
        "junk": _junk(folder / "junk.nii.gz"),
    }


def _junk(path: Path) -> Path:
    path.write_bytes(b"not a NIfTI file")
    return path


def register(files: dict[str, Path], out: Path, *extra: str, labels: bool = True) -> list[str]:
    arguments = ["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"])]
    if labels:
        arguments += ["--fixed-label", str(files["fixed_label"]), "--moving-label", str(files["moving_label"])]
    return [*arguments, "--out", str(out), "--device", "cpu", *extra]


def refused(capsys, arguments: list[str]) -> str:
    """Run ``arguments``: exit status 2 and exactly one line on stderr, no traceback; returns that line."""
    assert main(arguments) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("monai-unireg: error: ") and "Traceback" not in err
    return lines[0]


# ---- the parser: misspelt options, bounds with reasons, --version -------------------------------------------------


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["register", "--fixd", "a.nii.gz"], "unrecognised option --fixd (did you mean --fixed?)"),
        (["register", "--fix", "a.nii.gz"], "unrecognised option --fix (did you mean --fixed?)"),  # no abbreviations
        (["register", "--moving-labl=m.nii.gz"], "unrecognised option --moving-labl (did you mean --moving-label?)"),
        (["register", "--no-overveiw"], "unrecognised option --no-overveiw (did you mean --no-overview?)"),
        (["regster", "--out", "x"], "unknown 'regster'; expected one of register, demo (did you mean register?)"),
        (["register", "--method", "voxelop"], "--method: unknown 'voxelop'"),
        (["register", "--io-iterations", "1000000000"], "--io-iterations: expected a whole number from 0 to 10000"),
        (["register", "--io-iterations", "many"], "the paper uses 50), got 'many'"),
        (["register", "--io-iterations", "-5"], "from 0 to 10000"),
        (["register", "--labels", "-3"], "--labels: expected a whole number from 1 to 2147483647 (a label value"),
        (["register", "--labels", "0"], "0 is the background"),
        (["register", "--labels", "2.5"], "got '2.5'"),
        (["register", "--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["demo", "--seed", "-1"], "--seed: expected a whole number from 0 to 4294967295"),
        (["demo", "--out"], "--out: expected one argument"),
        ([], "a command is required: register or demo"),
        (["register", "--out", "x", "stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_command_lines_get_one_line_naming_the_option(capsys, arguments, expected):
    assert expected in refused(capsys, arguments)


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"monai-unireg {version('monai-unireg')}"


def test_help_imports_neither_torch_nor_monai_and_is_quick():
    """--help (top level and register) in a fresh interpreter: no torch / MONAI import, well under the 1 s target
    on an idle machine (the bound here is generous for a loaded CI machine)."""
    script = textwrap.dedent(
        """
        import sys, time
        start = time.perf_counter()
        from monai_unireg.cli import main
        for arguments in (["--help"], ["register", "--help"], ["demo", "--help"]):
            try:
                main(arguments)
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        heavy = sorted(m for m in ("torch", "monai", "numpy", "nibabel", "matplotlib") if m in sys.modules)
        print("HEAVY", heavy, "SECONDS", time.perf_counter() - start)
        """
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("HEAVY [] SECONDS"), summary
    assert float(summary.split()[-1]) < 5.0
    assert "--no-overview" in result.stdout and "replaces every one of them" in result.stdout


# ---- options checked before any file is read -------------------------------------------------------------------


def test_option_errors_come_before_reading_any_file(files, tmp_path, capsys):
    """The inputs are junk: each refusal names the option, not the unreadable file, so nothing was read."""
    junk = {**files, "fixed": files["junk"], "moving": files["junk"]}
    out = tmp_path / "out"
    cases = {
        ("--method", "unigradicon"): "--method unigradicon needs --weights PATH (the released Step_2_final.trch",
        ("--method", "unireg"): "--method unireg needs --weights PATH",
        ("--io-iterations", "5"): "--io-iterations does nothing for --method voxelopt; it applies to --method "
        "unigradicon or unireg",
        ("--task", "chest"): "--task does nothing for --method voxelopt",
        ("--weights", str(files["junk"])): "--weights does nothing for --method voxelopt",
        ("--method", "sacbnet", "--weights", str(tmp_path / "none.pt")): "--weights",
        ("--labels", "1", "--no-metrics"): "--labels chooses the labels of the metrics, which --no-metrics turns off",
        ("--labels", "1", "2", "1"): "--labels: 1 is given more than once",
    }
    for extra, expected in cases.items():
        assert expected in refused(capsys, register(junk, out, *extra)), extra
    assert not out.exists()
    missing = refused(capsys, register(junk, out, "--method", "sacbnet", "--weights", str(tmp_path / "none.pt")))
    assert "none.pt' does not exist; expected a file" in missing


def test_half_given_label_options_and_labels_without_maps_are_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    base = register(files, out, labels=False)
    only_fixed = refused(capsys, [*base, "--fixed-label", str(files["fixed_label"])])
    assert "--fixed-label was given without --moving-label" in only_fixed
    only_moving = refused(capsys, [*base, "--moving-label", str(files["moving_label"])])
    assert "--moving-label was given without --fixed-label" in only_moving
    assert "give --fixed-label and --moving-label with it" in refused(capsys, [*base, "--labels", "1"])
    assert "--fixed is required" in refused(capsys, ["register", "--moving", str(files["moving"]), "--out", "x"])
    folder = refused(capsys, [*base[:2], str(tmp_path), *base[3:]])
    assert f"--fixed {str(tmp_path)!r} is a folder; expected a file" in folder


def test_an_input_that_this_run_would_overwrite_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    moving = out / "warped.nii.gz"
    moving.write_bytes(files["moving"].read_bytes())
    line = refused(capsys, register({**files, "moving": moving}, out, labels=False))
    assert "is a result file this run writes; choose another --out" in line


# ---- the output folder: checked by a test write before registering ------------------------------------------------


def test_out_that_is_a_file_or_below_a_file_is_refused_before_reading(files, tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    junk = {**files, "fixed": files["junk"]}
    assert "is a file; expected a folder" in refused(capsys, register(junk, blocker))
    below = refused(capsys, register(junk, blocker / "run1"))
    assert f"lies below {str(blocker)!r}, which is a file" in below
    assert blocker.read_text() == "keep me"


def test_out_that_cannot_be_written_is_refused_before_reading(files, tmp_path, capsys, monkeypatch):
    import tempfile

    from monai_unireg.engines import pair_registration

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pair_registration.tempfile, "mkstemp", refuse)
    line = refused(capsys, register({**files, "fixed": files["junk"]}, tmp_path / "out"))
    assert "--out" in line and "is not writable: Permission denied" in line
    monkeypatch.setattr(pair_registration.tempfile, "mkstemp", tempfile.mkstemp)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(files, tmp_path, capsys):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert "is not writable" in refused(capsys, register(files, out))
        assert "cannot be created" in refused(capsys, register(files, out / "inner"))
    finally:
        out.chmod(0o700)


# ---- files and labels: named in the message -------------------------------------------------------------------------


def test_singular_or_non_finite_affine_names_the_file(files, tmp_path, capsys):
    data = np.asarray(nib.load(str(files["fixed"])).dataobj)
    flat = np.diag([2.0, 2.0, 2.0, 1.0])
    flat[2, 2] = 0.0  # a voxel size of 0 along z
    for name, affine in (("flat", flat), ("nan", np.where(np.eye(4) > 0, np.nan, 0.0))):
        header = nib.Nifti1Header()
        header.set_data_shape(data.shape)
        header.set_data_dtype(data.dtype)
        header["qform_code"], header["sform_code"] = 0, 1
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]  # as a broken writer
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, None, header=header), str(path))
        assert (
            not np.isfinite(nib.load(str(path)).affine).all() or abs(np.linalg.det(nib.load(str(path)).affine)) < 1e-9
        )
        line = refused(capsys, register({**files, "moving": path}, tmp_path / "out"))
        assert f"moving {str(path)!r} has a singular or non-finite voxel-to-world affine" in line


def test_labels_absent_from_both_maps_are_named(files, tmp_path, capsys):
    line = refused(capsys, register(files, tmp_path / "out", "--labels", "1", "99"))
    assert "labels 99 is in neither label map (fixed: 1, 2; moving: 1, 2, 3)" in line
    assert not (tmp_path / "out").exists()  # the folder this failed run made is removed again


def test_debug_shows_the_traceback(files, tmp_path):
    with pytest.raises(ValueError, match="is not a readable NIfTI file"):
        main(register({**files, "fixed": files["junk"]}, tmp_path / "out", "--debug"))


def test_an_internal_error_is_one_line_with_status_1(files, tmp_path, capsys, monkeypatch):
    from monai_unireg.engines import pair_registration

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(pair_registration, "evaluate_result", broken)
    assert main(register(files, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "internal error: TypeError: a bug (rerun with --debug)" in err


# ---- outputs: full disk, umask, reruns, temporaries ---------------------------------------------------------------


def test_full_disk_while_writing_is_one_line_and_keeps_the_earlier_results(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(register(files, out, "--no-overview")) == 0
    earlier = (out / "ddf.nii.gz").read_bytes()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_ddf", full)
    line = refused(capsys, register(files, out, "--no-overview"))
    assert f"could not write the results to {str(out)!r}: No space left on device" in line
    assert (out / "ddf.nii.gz").read_bytes() == earlier
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_respect_the_umask(files, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main(register(files, tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes) == {"warped.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "metrics.json", "overview.png"}
    assert set(modes.values()) == {0o666 & ~umask}


def test_a_rerun_replaces_every_file_of_the_earlier_run(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(register(files, out)) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(register(files, out, "--no-overview", "--no-metrics", labels=False)) == 0
    printed = capsys.readouterr().out
    assert "removed warped_label.nii.gz of an earlier run" in printed and "removed overview.png" in printed
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "ddf.nii.gz", "metrics.json", "notes.txt"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dice" not in metrics and set(metrics["timing_s"]) >= {"reading", "registering"}


def test_stale_temporaries_are_removed_and_an_interrupted_run_leaves_none(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / ".partial-abc123").mkdir(parents=True)
    (out / ".partial-abc123" / ".ddf.nii.gz.x.partial.nii.gz").write_bytes(b"half")
    (out / ".warped.nii.gz.k2j.partial.nii.gz").write_bytes(b"half")
    assert main(register(files, out, "--no-overview")) == 0
    printed = capsys.readouterr().out
    assert "removed 2 temporaries of an interrupted run" in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    original = io.save_nifti

    def interrupted(array, affine, path):
        original(array, affine, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_nifti", interrupted)
    assert main(register(files, tmp_path / "second")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()  # made by this run, left empty: removed again


def test_a_killed_run_leaves_at_most_one_temporary_that_the_next_run_removes(files, tmp_path, capsys):
    """SIGTERM while the results are written: no temporary left (exit 130); SIGKILL: at most one (the staging
    folder), removed by the next run into the folder."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from monai_unireg import io
        from monai_unireg.cli import main
        original = io.save_ddf
        def slow(*args, **kwargs):
            original(*args, **kwargs)
            print("WRITING", flush=True)
            time.sleep(120)
        io.save_ddf = slow
        sys.exit(main({register(files, Path("OUT"), "--no-overview")!r}))
        """
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    for kill, folder in ((signal.SIGTERM, tmp_path / "term"), (signal.SIGKILL, tmp_path / "kill")):
        code = script.replace("'OUT'", repr(str(folder)))
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
        )
        try:
            deadline = time.monotonic() + 180
            line = process.stdout.readline()
            while "WRITING" not in line and line and time.monotonic() < deadline:
                line = process.stdout.readline()
            assert "WRITING" in line, process.stderr.read()
            process.send_signal(kill)
            status = process.wait(timeout=60)
        finally:
            process.kill()
        if kill == signal.SIGTERM:
            assert status == 130 and not folder.exists()  # nothing left, not even the folder this run made
        else:
            leftovers = [p for p in folder.iterdir() if p.name.startswith(".")]
            assert len(leftovers) == 1 and io.TEMPORARY_INFIX in leftovers[0].name
    assert main(register(files, tmp_path / "kill", "--no-overview")) == 0
    assert "removed 1 temporary of an interrupted run" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "kill").iterdir() if p.name.startswith(".")]


def test_cuda_asked_for_on_a_machine_without_it_is_refused_before_reading(files, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arguments = register({**files, "fixed": files["junk"]}, tmp_path / "out")
    arguments[arguments.index("cpu")] = "cuda:1"
    assert "--device cuda:1: CUDA is not available on this machine; use --device cpu" in refused(capsys, arguments)
