"""Running a bundle in the tests: ``python -m monai.bundle run`` on the CPU with overrides, or its merged configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

#: ``torchrun`` with 2 local processes (the tests' multi-GPU runs, on CPU processes over Gloo).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

#: A ``run#1`` override of a train.yaml: the trainer exits the process as its first epoch completes (after the
#: epoch's checkpoint is written), as a kill would.
KILL_AFTER_THE_FIRST_EPOCH = (
    "$(@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_COMPLETED(once=1), lambda e: os._exit(3)),"
    " @train#trainer.run())"
)


class BundleRunner:
    """Commands, runs and merged configs of the bundle in ``bundle`` (its folder, e.g. ``bundles/unireg``)."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle

    def command(self, config_files: list[str], launcher: list[str] | None = None, **overrides: object) -> list[str]:
        """``python -m monai.bundle run`` (after ``launcher``, e.g. torchrun) on the CPU with ``--key value``
        overrides."""
        command = [
            *(launcher or [sys.executable]), "-m", "monai.bundle", "run",
            "--config_file", str(config_files),
            "--meta_file", "configs/metadata.json",
            "--logging_file", "configs/logging.conf",
            "--bundle_root", str(self.bundle),
            "--device", "$torch.device('cpu')",
        ]  # fmt: skip
        for key, value in overrides.items():
            command += [f"--{key}", str(value)]
        return command

    def run(
        self, config_files: list[str], succeed: bool = True, launcher: list[str] | None = None, **overrides: object
    ) -> str:
        """Run the bundle; returns its log. Fails the test when the run fails (``succeed=False``: when it
        succeeds)."""
        paths = [str(self.bundle), os.environ.get("PYTHONPATH", "")]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        command = self.command(config_files, launcher, **overrides)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=self.bundle)
        log = result.stdout + result.stderr
        assert (result.returncode == 0) == succeed, f"bundle run exited with {result.returncode}:\n{log[-6000:]}"
        return log

    def resume_after_a_kill(
        self, config_files: list[str], overrides: dict, output_dir: Path, resumed: dict | None = None
    ) -> str:
        """Train with ``overrides``, killed right after the first epoch's checkpoint (``os._exit``, no clean-up),
        then run the same command again (``resumed``: other overrides for it naming the same run); checks that the
        second run resumed from that checkpoint instead of starting over, and returns its log."""
        self.run(config_files, succeed=False, **overrides, **{"run#1": KILL_AFTER_THE_FIRST_EPOCH})
        assert sorted(path.name for path in output_dir.glob("*.pt")) == ["checkpoint_epoch=1.pt"]
        log = self.run(config_files, **(overrides if resumed is None else resumed))
        assert "Restored all variables from" in log and "Epoch[1] Complete" not in log.split("Restored")[1]
        return log

    def parse(self, config_files: list[str], **overrides: object) -> ConfigParser:
        """The bundle's configs merged as ``monai.bundle run`` merges them, without running anything."""
        parser = ConfigParser()
        parser.read_config([str(self.bundle / name) for name in config_files])
        parser.update({"bundle_root": str(self.bundle), **overrides})
        return parser


def read_checkpoint(folder: Path) -> dict:
    """The ``checkpoint.pt`` of a training folder, or its newest ``checkpoint_epoch=N.pt`` (MONAI's
    ``CheckpointSaver``)."""
    from monai_unireg.engines.bundle import latest_checkpoint

    path = folder / "checkpoint.pt" if (folder / "checkpoint.pt").exists() else latest_checkpoint(folder)
    return torch.load(path, map_location="cpu", weights_only=True)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The network weights of a training folder's ``model.pt`` (its ``model`` entry when it holds the config too)."""
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    return saved["model"] if "model" in saved else saved


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    """The same keys and bit-identical tensors."""
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def assert_merged_evaluation(output_dir: Path, pair_names: list[str]) -> None:
    """A (multi-process) evaluation wrote every pair's folder and one ``metrics.csv`` / ``summary.json`` with a row
    per pair, in the pairs' order."""
    import csv
    import json

    assert all((output_dir / name / "ddf.nii.gz").is_file() for name in pair_names)
    with open(output_dir / "metrics.csv", newline="") as handle:
        assert [row["pair"] for row in csv.DictReader(handle)] == pair_names
    assert json.loads((output_dir / "summary.json").read_text())["dice_mean"]["n"] == len(pair_names)
