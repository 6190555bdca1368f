"""``python -m noblankslate.cli`` = ``nbs``."""

import sys

from noblankslate.cli import main

sys.exit(main())
