"""`python -m frmap.engine.cli`: the `frmap` command."""

import sys

from frmap.engine.cli.main import main

sys.exit(main())
