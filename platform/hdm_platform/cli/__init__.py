"""The ``hdm`` command line: one module per command group, registered here.

Every module imports only click and light modules at the top and the heavy ones (torch,
Ray, MLflow) inside the command that uses them, so ``hdm --help`` answers at once. A
failure is one line naming what failed; ``-v`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

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
from hdm_platform.console import VERBOSE_VARIABLE
from hdm_platform.cli.tune import tune


class _OneLineErrors(click.Group):
    """A group whose unexpected exceptions end in one line (``error: Type: message``);
    with ``-v`` the traceback follows, as it would without this group."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as error:
            if ctx.meta.get(_VERBOSE):
                traceback.print_exc(file=sys.stderr)
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            hint = "" if ctx.meta.get(_VERBOSE) else " (-v shows the traceback)"
            # The command line names the file, URI or endpoint the failure is about.
            command = " ".join(["hdm", *sys.argv[1:]])[:300]
            raise click.ClickException(f"{command}: {type(error).__name__}: {message}{hint}") from None


_VERBOSE = "hdm.verbose"


@click.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="hdm")
@click.option(
    "-v", "--verbose", is_flag=True,
    help="Show Ray's and MLflow's logs, per-worker output and tracebacks on the console.",
)  # fmt: skip
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Train, sweep and serve HDM image-enhancement models (dehaze, derain, low-light).

    Shell completion (bash): eval "$(_HDM_COMPLETE=bash_source hdm)"; zsh_source and
    fish_source for zsh and fish.
    """
    ctx.meta[_VERBOSE] = verbose
    if verbose:
        # Read by what the command starts too (Ray's driver settings, jobs, workers).
        os.environ[VERBOSE_VARIABLE] = "1"


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
