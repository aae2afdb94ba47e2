"""``python -m remoteloss_bench ARGS`` is ``remoteloss bench ARGS``."""

import sys

from remoteloss_bench.command import main

sys.exit(main())
