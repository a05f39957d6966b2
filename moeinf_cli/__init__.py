"""The moeinf command line: a Typer app, one module per command under ``moeinf_cli/commands``."""
