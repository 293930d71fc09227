"""`python -m klotski_jax.cli ...`: the `klotski` command."""

import sys

from klotski_jax.cli.main import main

sys.exit(main())
