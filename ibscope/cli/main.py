"""The ``ibscope`` command line. One small module per command; heavy imports inside commands."""

from __future__ import annotations

import typer

from ibscope._version import __version__
from ibscope.cli._help import IbscopeGroup, polish_app

app = typer.Typer(
    cls=IbscopeGroup,
    name="ibscope",
    help=(
        "Information planes, representation geometry and OOD reports for your own PyTorch runs.\n\n"
        "Pipeline: capture (checkpoints -> activation store) -> estimate (store -> results table) "
        "-> plot / report / check. Exit codes: 0 ok, 1 error, 2 usage, 3 regression (check), "
        "4 bad data or schema, 5 plug-in failure."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ibscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """ibscope: see what each layer keeps of its input and labels as training goes on."""


def _register_all() -> None:
    from ibscope.cli import capture, check, estimate, ood, plot, run, sweep, validate

    for mod in (run, sweep, capture, estimate, plot, validate, ood, check):
        mod.register(app)
    polish_app(app)  # help re-flowed, no <bool> on flags, choice errors with a did-you-mean (cli/_help.py)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
