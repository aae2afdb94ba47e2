"""The load generator of the ``remoteloss-server`` distribution: ``remoteloss bench``.

It is a client of a server, built on the SDK, but not part of the SDK's distribution: installing
``remoteloss-server`` adds the ``bench`` command to the ``remoteloss`` command line (the entry
point ``COMMAND`` in the group ``remoteloss.commands``). ``command`` is the command (arguments,
report, plot), ``load`` the closed-loop callers, ``payload`` the request of each loss.
"""

from remoteloss.cli import Command

__all__ = ["COMMAND"]

# What `remoteloss --help` lists: the module is imported only when the command runs.
COMMAND = Command("remoteloss_bench.command", "measure the server's latency and throughput")
