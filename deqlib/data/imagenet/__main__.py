"""``python -m deqlib.data.imagenet prepare|throughput ...`` (see :func:`deqlib.data.imagenet.throughput.main`)."""

import sys

from .throughput import main

sys.exit(main())
