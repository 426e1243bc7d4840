"""``python -m jaxcompress``: the same command line as the ``jaxcompress`` console script."""

import sys

from jaxcompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
