"""`python -m verify.cli ...`: the same as the `handmodel` console script."""
import sys

from verify.cli import main

sys.exit(main())
