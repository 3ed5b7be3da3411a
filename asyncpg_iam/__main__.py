"""``python -m asyncpg_iam``: the ``asyncpg-iam`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
