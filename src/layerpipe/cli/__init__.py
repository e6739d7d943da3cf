"""The `layerpipe` command line: one module per subcommand."""
