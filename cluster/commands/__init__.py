"""One module per `segr1` subcommand: `register(subparsers)` adds its parser and sets `func`."""
