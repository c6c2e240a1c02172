"""``python -m nme.cli``: the same as the ``nme`` console script."""

import sys

from nme.cli import main

sys.exit(main())
