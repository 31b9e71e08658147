"""``python -m monai_unireg``: the ``monai-unireg`` command line."""

from monai_unireg.cli import run

run()
