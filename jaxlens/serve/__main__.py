"""`python -m jaxlens.serve`: the explorer's command (see `jaxlens.serve.command`)."""

from jaxlens.serve.command import main

main()
