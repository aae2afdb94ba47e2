"""``descriptors.ensure_open_files``, in a child process whose limits it may change."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

_CHILD = """
import logging, resource, sys
from remoteloss_server.descriptors import ensure_open_files
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("returned", ensure_open_files(int(sys.argv[3])))
print("now", *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _run(soft: int, hard: int, wanted: int) -> str:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(soft), str(hard), str(wanted)],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


@pytest.mark.parametrize(("soft", "hard", "wanted", "now", "warned"), [
    (256, 2048, 1024, 1024, False),  # raised to what is wanted
    (256, 512, 1024, 512, True),  # to the hard limit, with a warning naming the shortfall
    (2048, 2048, 1024, 2048, False),  # already enough: untouched
])
def test_the_soft_limit_rises_toward_what_is_wanted(soft: int, hard: int, wanted: int, now: int, warned: bool) -> None:
    ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if ceiling != resource.RLIM_INFINITY and ceiling < hard:
        pytest.skip(f"this process's hard limit on open files is {ceiling}, below the case's {hard}")
    out = _run(soft, hard, wanted)
    assert f"returned {now}" in out and f"now {now} {hard}" in out, out
    assert ("WARNING event=open_files_limit" in out) == warned, out
