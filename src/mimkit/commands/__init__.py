"""The subcommands beyond ``pretrain``: each module has ``register(groups, common)`` (called by :mod:`mimkit.cli`)
and functions ``cmd_*(args) -> int`` that parse and dispatch to the library. Nothing below imports from here."""
