"""CLI command groups, one module per issue area; importing a module registers its commands on
`forethought.cli.app`. Each command parses flags, calls one library function and presents its result."""
