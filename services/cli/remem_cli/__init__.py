"""The `remem` command: one subcommand per service plus operator commands."""
