"""The ``hdm`` command line: one module per command group, registered here."""

from __future__ import annotations

import click

from hdm_platform import __version__
from hdm_platform.cli.data import data
from hdm_platform.cli.enhance import enhance, explain
from hdm_platform.cli.local import local
from hdm_platform.cli.model import model
from hdm_platform.cli.serve import serve
from hdm_platform.cli.submit import submit
from hdm_platform.cli.evaluate import compare, evaluate
from hdm_platform.cli.train import train
from hdm_platform.cli.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hdm")
def main() -> None:
    """Train, sweep and serve HDM image-enhancement models (dehaze, derain, low-light)."""


main.add_command(model)
main.add_command(enhance)
main.add_command(explain)
main.add_command(data)
main.add_command(train)
main.add_command(evaluate)
main.add_command(compare)
main.add_command(submit)
main.add_command(serve)
main.add_command(tune)
main.add_command(local)
