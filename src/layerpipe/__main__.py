"""`python -m layerpipe` runs the command line."""
import sys

from layerpipe.cli.main import main

sys.exit(main())
