"""``python -m remoteloss_server``: the same as the ``remoteloss-server`` command."""

import sys

from remoteloss_server.cli import main

sys.exit(main())
