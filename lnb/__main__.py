"""``python -m lnb`` is the ``lnb`` command."""

import sys

from .cli import main

sys.exit(main())
