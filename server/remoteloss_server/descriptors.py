"""The process's limit on open files, raised at start to what ``max_connections`` needs.

Every connection is a file descriptor, and a common default soft limit is 1,024: below what
``max_connections`` allows on two ports, a flood of connections would run the process out of
descriptors (no new connection, no file opened, on any port) before the bound refuses one. The
soft limit is raised toward what is wanted, up to the hard limit, which only the system can raise.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["ensure_open_files"]

logger = logging.getLogger(__name__)


def ensure_open_files(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` where it is lower (at most to the hard limit);
    the soft limit now. A warning names the shortfall when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        logger.info("event=open_files_limit soft=%d was=%d", target, soft)
    if target < wanted:
        logger.warning(
            "event=open_files_limit soft=%d wanted=%d note=%s", target, wanted,
            '"the hard limit is lower than max_connections needs on both ports: raise it (ulimit -Hn), '
            'or lower max_connections"',
        )
    return target
