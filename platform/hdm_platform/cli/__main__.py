"""``python -m hdm_platform.cli``: the ``hdm`` command."""

from hdm_platform.cli import main

main(prog_name="hdm")
