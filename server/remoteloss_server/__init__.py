"""remoteloss server: every ``torch.nn`` loss, computed remotely over gRPC, with gradients.

Run it with ``remoteloss-server`` or ``python -m remoteloss_server``; embed it with
:class:`remoteloss_server.app.ServerThread`.
"""

__version__ = "0.1.0"
