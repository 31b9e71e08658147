"""Pieces shared by the bundles' workflows (uniGradICON, SACB-Net, PromptReg, UniReg).

:func:`write_result_table` writes an evaluation table as CSV and markdown, its cells from
:func:`spread_summary` and :func:`mean_spread_cell`; :func:`check_datasets` and
:func:`load_validation_pairs` check the data a workflow is given.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_unireg import io
from monai_unireg.data import load_learn2reg
from monai_unireg.validation import check_integer

__all__ = ["check_datasets", "load_validation_pairs", "mean_spread_cell", "spread_summary", "write_result_table"]


def spread_summary(values: Sequence[float], spread: str = "std") -> dict[str, float]:
    """``n`` and, with values, their ``mean`` and ``spread``: ``"std"`` (population standard deviation) or ``"sem"``
    (standard error of the mean, the sample standard deviation over ``sqrt(n)``; 0 for one value)."""
    array = np.asarray(values, dtype=float)
    if not array.size:
        return {"n": 0}
    if spread == "std":
        deviation = float(array.std())
    else:
        deviation = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), spread: deviation, "n": int(array.size)}


def mean_spread_cell(summary: dict[str, float], spread: str | None = "std", digits: int = 1) -> str:
    """A table cell of a :func:`spread_summary`: ``"mean ± spread"`` (``spread`` ``None``: the mean alone) with
    ``digits`` decimals; ``"n/a"`` without values."""
    if not summary["n"]:
        return "n/a"
    mean = f"{summary['mean']:.{digits}f}"
    return mean if spread is None else f"{mean} ± {summary[spread]:.{digits}f}"


def write_result_table(path_stem: Path, header: Sequence[str], rows: Sequence[Sequence[str]], footnote: str) -> None:
    """Write a table as ``<path_stem>.csv`` and as ``<path_stem>.md`` (a markdown table and ``footnote`` below it),
    each atomically.

    Args:
        path_stem: the files' path without suffix, e.g. ``out/evaluation_table``.
        header: the column names.
        rows: the cells, one sequence per row.
        footnote: what the numbers are (the markdown file's last paragraph).
    """
    with io.atomic_path(path_stem.with_suffix(".csv")) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])
    markdown = [
        f"| {' | '.join(header)} |",
        f"|{'---|' * len(header)}",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        footnote,
    ]
    with io.atomic_path(path_stem.with_suffix(".md")) as temporary:
        temporary.write_text("\n".join(markdown) + "\n", encoding="utf-8")


def check_datasets(datasets: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """``datasets`` as a list, checked to be a non-empty list of Learn2Reg ``*_dataset.json`` paths.

    Raises:
        ValueError: a single path (a string) or an empty list.
    """
    if isinstance(datasets, (str, os.PathLike)) or not datasets:
        raise ValueError(f"datasets must be a non-empty list of Learn2Reg *_dataset.json paths, got {datasets!r}.")
    return list(datasets)


def load_validation_pairs(
    dataset_json: str | os.PathLike | None, section: str = "registration_val", max_pairs: int | None = None
) -> list[dict[str, str]]:
    """The labelled pairs scored after every training epoch: the first ``max_pairs`` of ``section``.

    Returns ``[]`` when ``dataset_json`` is ``None``.

    Raises:
        ValueError: a pair lacks a fixed or moving label (Dice needs both), or ``max_pairs`` < 1.
    """
    if dataset_json is None:
        return []
    if max_pairs is not None:
        check_integer(max_pairs, "max_validation_pairs", 1)
    pairs = load_learn2reg(dataset_json, section)[:max_pairs]
    for pair in pairs:
        if "fixed_label" not in pair or "moving_label" not in pair:
            raise ValueError(
                f"validation_json {os.fspath(dataset_json)!r}: the {section} pair {pair['fixed_image']} <- "
                f"{pair['moving_image']} lacks a label map; validation Dice needs both labels."
            )
    return pairs
