"""`python -m maskdistill` runs the command line."""

import sys

from maskdistill.cli import main

sys.exit(main())
