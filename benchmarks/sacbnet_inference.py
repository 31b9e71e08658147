"""SACB-Net inference at the paper's IXI size (160x192x224) on this CPU: time, peak memory and the K-Means share.

Runs the default network (1.1 M parameters, N = 7 clusters, random weights with a fixed seed: the cost does not
depend on the weights' values) on the first BrainSynth ``registration_val`` pair resized to 160x192x224 (real
anatomy, so the clusters are those of real features), batch 1, without autograd, once to warm up and then
``--repeats`` times, in two settings, each in its own process (so that each peak memory is its own):

- ``all voxels``: K-Means fitted on every voxel (the default, as the authors' code);
- ``subsample``: K-Means fitted on 32,768 evenly spaced voxels, then every voxel labelled
  (``kmeans_fit_points=32768``; both capped at 50 Lloyd iterations).

Printed per setting: the median wall time, the time spent inside K-Means (its share of the total), the peak
resident memory of the process, and the largest and mean difference between the two fields (voxels), so that
what the subsampled fit changes shows next to what it saves.

    python benchmarks/sacbnet_inference.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from monai_unireg.data import load_learn2reg
from monai_unireg.engines import normalise_intensity, read_volume
from monai_unireg.networks.blocks import sacb
from monai_unireg.networks.nets import SACBNet
from monai_unireg.spatial import resize_image

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
SIZE = (160, 192, 224)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setting", choices=("all", "subsample"), help=argparse.SUPPRESS)  # one process per setting
    parser.add_argument("--field", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def load_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """The first BrainSynth validation pair in [0, 1], resized to :data:`SIZE`: ``[1, 1, *SIZE]`` each."""
    pair = load_learn2reg(DATA / "BrainSynth" / "BrainSynth_dataset.json", "registration_val")[0]
    images = []
    for role in ("moving", "fixed"):
        image, _ = read_volume(pair[f"{role}_image"], f"{role}_image")
        images.append(resize_image(normalise_intensity(image.float(), "mri"), SIZE))
    return images[0], images[1]


def run_setting(arguments: argparse.Namespace) -> None:
    """Time one setting in this process and print a JSON line; save the field for the comparison."""
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    network = SACBNet(input_size=SIZE, kmeans_fit_points=32768 if arguments.setting == "subsample" else None).eval()
    moving, fixed = load_pair()
    kmeans_seconds = [0.0]
    timed_kmeans = sacb.kmeans

    def counting_kmeans(*args, **kwargs):
        started = time.perf_counter()
        result = timed_kmeans(*args, **kwargs)
        kmeans_seconds[0] += time.perf_counter() - started
        return result

    sacb.kmeans = counting_kmeans
    totals, shares = [], []
    with torch.no_grad():
        ddf = network(moving, fixed)
        for _ in range(arguments.repeats):
            kmeans_seconds[0] = 0.0
            started = time.perf_counter()
            ddf = network(moving, fixed)
            totals.append(time.perf_counter() - started)
            shares.append(kmeans_seconds[0])
    torch.save(ddf, arguments.field)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    index = totals.index(statistics.median(totals))
    print(json.dumps({"seconds": totals[index], "kmeans_seconds": shares[index], "peak_gb": peak_gb}))


def main() -> None:
    arguments = parse_args()
    if arguments.setting:
        run_setting(arguments)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for setting in ("all", "subsample"):
            field = Path(folder) / f"{setting}.pt"
            command = [sys.executable, __file__, "--setting", setting, "--field", str(field)]
            command += ["--repeats", str(arguments.repeats), "--threads", str(arguments.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[setting] = json.loads(output.strip().splitlines()[-1])
            results[setting]["field"] = torch.load(field)
    difference = (results["subsample"]["field"] - results["all"]["field"]).abs()
    print(
        f"SACB-Net inference at {'x'.join(map(str, SIZE))}, batch 1, {arguments.threads} threads, "
        f"torch {torch.__version__}; median of {arguments.repeats} after a warm-up"
    )
    print(f"{'K-Means fit on':<22}{'s/pair':>8}{'K-Means s':>11}{'share':>7}{'peak GB':>9}")
    for setting, name in (("all", "all voxels (default)"), ("subsample", "32,768 voxels")):
        row = results[setting]
        share = row["kmeans_seconds"] / row["seconds"]
        print(f"{name:<22}{row['seconds']:>8.1f}{row['kmeans_seconds']:>11.2f}{share:>7.0%}{row['peak_gb']:>9.2f}")
    print(f"subsample / all voxels time: {results['subsample']['seconds'] / results['all']['seconds']:.2f}x")
    print(f"field difference subsample vs all voxels: max {difference.max():.3f}, mean {difference.mean():.4f} voxels")


if __name__ == "__main__":
    main()
