"""Command-line tools. Each module has `main(argv=None) -> int`: 0 ok, 2 bad input (message names it)."""
