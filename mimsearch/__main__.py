"""`python -m mimsearch ...` is the `mimsearch` command."""

import sys

from mimsearch.cli import main

sys.exit(main())
