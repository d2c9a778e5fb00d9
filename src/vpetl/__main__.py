"""``python -m vpetl``: the ``vpetl`` command (:mod:`vpetl.cli`)."""

import sys

from .cli import main

sys.exit(main())
