"""``python -m deqlib.data.imagenet prepare|throughput ...`` (see :func:`deqlib.data.imagenet.main`)."""

import sys

from . import main

sys.exit(main())
