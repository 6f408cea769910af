"""The `tandem` subcommands: one module each, exposing `register(subparsers)` and `run(args) -> int`.

To add a subcommand, write cli/NAME.py and add "NAME" to COMMANDS (one line).
Modules import heavy packages (torch, the engine) inside `run`, so `tandem status` starts fast.
"""

COMMANDS = (
    "serve",
    "complete",
    "chat",
    "status",
    "up",
    "promote",
    "learn",
    "plot",
    "balance",
)
