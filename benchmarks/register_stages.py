"""Whole-process timing of ``monai-unireg register``, stage by stage, for two checkouts side by side.

Runs the command as a user would (``python -m monai_unireg register --fixed F --moving M --out DIR --device cpu``)
with ``PYTHONPATH`` set to each checkout in turn, interleaved (old, new, old, new, ...), so that both see the same
machine load; reports the medians and the ratio new / old of:

- ``wall``: the process's wall time, CPU time (user + sys) and peak RSS (``os.wait4`` on the process itself);
- the command's own split from its last line (``setup``, ``reading``, ``registering``, ``evaluating``,
  ``writing``, ``network``, ``start-up and imports``);
- ``exit``: from that line to the end of the process (interpreter shutdown: the garbage collector's last walk);
- ``outside``: everything but the network call, and its share of the network call (issue 13: <= 25 %).

The load average is printed beside every run. Without ``--fixed`` / ``--moving`` the 8-bit BrainVXM2mm
known-field pair of ``benchmarks/peers.py`` is made in ``--workdir`` first (``peers.py --methods identity``).

    python benchmarks/register_stages.py --old /work/main --new . --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"done in ([\d.]+) s wall: (.*)$")
STAGE = re.compile(r"(?:\(network ([\d.]+) s\))|([a-z -]+?) ([\d.]+) s")


def parse_summary(line: str) -> dict[str, float]:
    """The stage seconds of the command's last line (``done in T s wall: setup 0.9 s, ... (network 7.2 s), ...``)."""
    match = DONE.search(line)
    if match is None:
        raise ValueError(f"no summary line in the command's output: {line!r}")
    stages = {"reported": float(match.group(1))}
    for network, name, seconds in STAGE.findall(match.group(2)):
        if network:
            stages["network"] = float(network)
        else:
            stages[name.strip(" ,")] = float(seconds)
    return stages


def run_once(checkout: Path, arguments: list[str], threads: int, out: Path) -> dict[str, float]:
    """One process of the command from ``checkout``: its measures and stage split."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "monai_unireg", *arguments, "--out", str(out), "--device", "cpu"],
        env=env,
        cwd=checkout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    summary_at, last = None, ""
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("done in"):
            summary_at, last = time.perf_counter(), line.strip()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0 or summary_at is None:
        raise RuntimeError(f"{checkout}: the command failed (status {status}); last line {last!r}")
    record = parse_summary(last)
    record.update(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_mib=usage.ru_maxrss / 1024.0,
        exit=wall - (summary_at - start),
        load=load,
    )
    record["outside"] = wall - record["network"]
    record["outside_share"] = record["outside"] / record["network"]
    return record


def make_case(workdir: Path) -> tuple[Path, Path]:
    """The 8-bit BrainVXM2mm known-field pair of ``peers.py`` in ``workdir`` (made once)."""
    fixed, moving = workdir / "vxm2mm-8bit_fixed.nii.gz", workdir / "vxm2mm-8bit_moving.nii.gz"
    if not (fixed.is_file() and moving.is_file()):
        command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--methods", "identity"]
        command += ["--cases", "vxm2mm-8bit", "--workdir", str(workdir), "--out", str(workdir / "identity.json")]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    return fixed, moving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the baseline (e.g. /work/main)")
    parser.add_argument("--new", type=Path, default=ROOT, help="checkout measured against it (default: this one)")
    parser.add_argument("--fixed", type=Path)
    parser.add_argument("--moving", type=Path)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more register options, last")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "register_stages")
    parser.add_argument("--json", type=Path, help="write every run's record here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    fixed, moving = (args.fixed, args.moving) if args.fixed else make_case(args.workdir)
    arguments = ["register", "--fixed", str(fixed), "--moving", str(moving), *args.extra]
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for round_index in range(args.rounds):
        for name in ("old", "new") if round_index % 2 == 0 else ("new", "old"):
            checkout = (args.old if name == "old" else args.new).resolve()
            record = run_once(checkout, arguments, args.threads, args.workdir / f"out_{name}")
            runs[name].append(record)
            print(
                f"round {round_index + 1} {name}: wall {record['wall']:.2f} s, network {record['network']:.2f} s, "
                f"outside {record['outside']:.2f} s, exit {record['exit']:.2f} s, peak {record['peak_mib']:.0f} MiB "
                f"(load {record['load']:.2f})",
                flush=True,
            )
    keys = [key for key in runs["old"][0] if key != "load" and all(key in r for r in runs["new"])]
    print(f"\nmedians over {args.rounds} rounds (load {os.getloadavg()[0]:.2f} at the end)")
    print(f"{'measure':24s} {'old':>9s} {'new':>9s} {'new/old':>8s}")
    for key in keys:
        old = statistics.median(r[key] for r in runs["old"])
        new = statistics.median(r[key] for r in runs["new"])
        ratio = new / old if old else float("nan")
        print(f"{key:24s} {old:9.3f} {new:9.3f} {ratio:8.2f}")
    ratios = [n["wall"] / o["wall"] for o, n in zip(runs["old"], runs["new"])]
    print(f"wall new/old per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
