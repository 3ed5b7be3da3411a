"""``python -m asyncpg_iam.cli``: the ``asyncpg-iam`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
