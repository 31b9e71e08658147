"""The command line's default path (VoxelOpt + refinement, SDlogJ, writing) imports no MONAI: importing it costs
the command about 3 s (``benchmarks/register_stages.py``); the packages resolve their names lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

REGISTER_PATH = (
    "monai_unireg.cli",
    "monai_unireg.engines.pair_registration",
    "monai_unireg.engines.refinement",
    "monai_unireg.networks.nets.voxelopt",
    "monai_unireg.io",
    "monai_unireg.metrics.labels",
    "monai_unireg.metrics.hausdorff",
)


def test_register_path_imports_no_monai() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in REGISTER_PATH)
        + "from monai_unireg.cli import _method_defaults\n_method_defaults('voxelopt')\n"
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'ignite', 'matplotlib')))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


#: The packages whose names load on first use (``monai_unireg._lazy``).
LAZY_PACKAGES = [
    "monai_unireg.engines",
    "monai_unireg.losses",
    "monai_unireg.metrics",
    "monai_unireg.transforms",
    "monai_unireg.data",
    "monai_unireg.networks.nets",
    "monai_unireg.networks.blocks",
]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_packages_resolve_every_exported_name(package: str) -> None:
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_name  # noqa: B018


def test_method_defaults_are_the_packages_table() -> None:
    from monai_unireg.engines import METHOD_DEFAULTS, method_defaults

    assert all(method_defaults(name) is defaults for name, defaults in METHOD_DEFAULTS.items())
    with pytest.raises(ValueError, match="method must be one of"):
        method_defaults("ants")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_submodule_is_an_attribute(package: str) -> None:
    # a module file added to a package must be listed in its _SUBMODULES (configs name package.module.X)
    import importlib
    import pkgutil

    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        assert info.name in module._SUBMODULES, f"{package}.{info.name} missing from _SUBMODULES"
        # a name that is also an export is the export (the function kmeans of kmeans.py), as an eager import gave
        expected = f"{package}.{info.name}" if info.name not in module._EXPORTS else info.name
        assert getattr(module, info.name).__name__ == expected


def test_an_export_named_like_its_submodule_is_the_export_whatever_was_imported_first() -> None:
    # networks.blocks.kmeans is the function; importing the module networks/blocks/kmeans.py first must not shadow it
    code = (
        "import monai_unireg.networks.blocks.kmeans\n"
        "from monai_unireg.networks.blocks import kmeans\n"
        "print(callable(kmeans) and kmeans.__name__ == 'kmeans' and not hasattr(kmeans, '__file__'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
