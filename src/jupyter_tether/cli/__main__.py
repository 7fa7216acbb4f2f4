"""``python -m jupyter_tether.cli``: the ``jupyter-tether`` command."""

import sys

from .app import main

sys.exit(main())
