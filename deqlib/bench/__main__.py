"""``python -m deqlib.bench``: see :mod:`deqlib.bench.cli`."""

import sys

from .cli import main

sys.exit(main())
