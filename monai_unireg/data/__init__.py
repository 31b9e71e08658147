"""Datasets: Learn2Reg ``*_dataset.json`` reader and seeded multi-dataset pair sampling."""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "PAIR_FOLDER_SUFFIXES": ".learn2reg",
    "PAIR_SECTIONS": ".learn2reg",
    "Learn2RegDataset": ".learn2reg",
    "find_learn2reg_datasets": ".learn2reg",
    "label_path_for": ".learn2reg",
    "load_learn2reg": ".learn2reg",
    "load_pair_folder": ".learn2reg",
    "make_pair": ".learn2reg",
    "pair_name": ".learn2reg",
    "read_learn2reg": ".learn2reg",
    "EpochPairDataset": ".sampler",
    "PairSampler": ".sampler",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("learn2reg", "sampler", "synthetic")

__all__ = [
    "PAIR_FOLDER_SUFFIXES",
    "PAIR_SECTIONS",
    "EpochPairDataset",
    "Learn2RegDataset",
    "PairSampler",
    "find_learn2reg_datasets",
    "label_path_for",
    "load_learn2reg",
    "load_pair_folder",
    "make_pair",
    "pair_name",
    "read_learn2reg",
]

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
