"""``python -m doconv_core``: the ``doconv`` command (see doconv_core.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
