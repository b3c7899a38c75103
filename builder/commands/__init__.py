"""The builder's ``dnd-atlas`` commands: argument parsing and output only,
over the library functions (declared as entry points in pyproject.toml)."""
