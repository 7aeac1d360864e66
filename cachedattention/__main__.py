"""`python -m cachedattention ...`: the `cachedattention` command."""

import sys

from cachedattention.cli import main

sys.exit(main())
