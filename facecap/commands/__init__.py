"""`facecap` subcommands beyond curate/example-data/config, one module each.

Each module defines ``register(subparsers, add_config_args)``, which adds its
parser and sets ``handler=`` to a function ``(args) -> exit code``. The CLI
discovers the modules here, so a command is added by adding a file.
Errors meant for the user are raised as ``facecap.settings.ConfigError`` (exit 2).
"""
