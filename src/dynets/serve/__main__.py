"""`python -m dynets.serve serve DIR ...` / `python -m dynets.serve export DIR ...`."""

import sys

from dynets.serve.cli import main

sys.exit(main())
