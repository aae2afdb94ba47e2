"""The subcommands of ``remoteloss`` (see ``remoteloss.cli``): one module each, with
``add_arguments(parser)`` and ``run(args) -> int``."""
