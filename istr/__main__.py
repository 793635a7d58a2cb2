"""`python -m istr`: the istr command line (same as the `istr` console script)."""
import sys

from istr.cli import main

if __name__ == "__main__":
    sys.exit(main())
