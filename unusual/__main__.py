"""``python -m unusual`` is the ``unusual`` command."""

import sys

from .cli import main

sys.exit(main())
