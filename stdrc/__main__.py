"""`python -m stdrc`: the `stdrc` command."""

import sys

from stdrc.cli import main

sys.exit(main())
