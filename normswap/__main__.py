"""``python -m normswap``: the same as the ``normswap`` command."""

from .cli import main

main(prog_name="normswap")
