"""The `alloy` command line: one typer app, each command a thin wrapper over a library call."""
