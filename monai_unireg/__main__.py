"""``python -m monai_unireg``: the ``monai-unireg`` command line."""

import sys

from monai_unireg.cli import main

sys.exit(main())
