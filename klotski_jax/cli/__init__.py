"""The `klotski` command line (`klotski = "klotski_jax.cli:main"`): main.py builds the parser;
options.py holds the option types and the budget / I/O options the subcommands share; one module
per subcommand."""

from klotski_jax.cli.main import EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]
