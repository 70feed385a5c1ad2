"""``python -m bssagent.cli``: the ``bssagent`` command without the console script."""

import sys

from . import main

sys.exit(main())
