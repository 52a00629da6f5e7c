"""`python -m models train|evaluate|replay` -- same commands as `profilestream`."""

import sys

from models.cli import main

sys.exit(main())
