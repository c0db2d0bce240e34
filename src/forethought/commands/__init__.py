"""CLI commands, one module per area; importing a module registers its commands on the one Typer app in
`commands/common.py` (with the shared options and model loading). Each command parses flags, calls one
library function and presents its result; `forethought.cli` only assembles them."""
