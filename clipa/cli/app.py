"""The `clipa` command line: the commands in the order `clipa --help` lists them, and the entry point.

Each command group lives in its own module (train, info, tools, evaluate, data) and only parses, calls
the plain-Python core and renders (clipa/cli/render.py). Exit codes: 0 success; 2 bad usage, recipe,
path or name (one line naming it and the fix); 1 an unexpected failure (with a traceback, because
that is a bug to report).
"""

from __future__ import annotations

import sys

import typer

from clipa import __version__
from clipa.cli import data, evaluate, info, tools, train
from clipa.cli.render import out

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Affordable CLIP training: low-token pretraining, short full-length finetuning, zero-shot eval.")
data_app = typer.Typer(no_args_is_help=True, help="Write and inspect datasets.")
app.add_typer(data_app, name="data")
scaling_app = typer.Typer(no_args_is_help=True, help="Scaling laws: fit error against training compute.")
app.add_typer(scaling_app, name="scaling")


def _version(value: bool) -> None:
    if value:
        out.print(f"clipa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


app.command("pretrain")(train.pretrain)
app.command("finetune")(train.finetune)
app.command("validate")(train.validate)
app.command("ls")(info.list_recipes)
app.command("cp")(info.copy_recipe)
app.command("models")(info.models)
app.command("runs")(info.runs)
app.command("export")(train.export)
app.command("plan")(tools.plan)
scaling_app.command("fit")(tools.scaling_fit)
app.command("zeroshot")(evaluate.zeroshot)
app.command("retrieval")(evaluate.retrieval)
app.command("linear-probe")(evaluate.linear_probe)
app.command("report")(tools.report)
app.command("bench")(tools.bench)
data_app.command("synth")(data.synth)
data_app.command("inspect")(data.inspect)
app.command("quickstart")(train.quickstart)


def main() -> None:
    from clipa.distributed import leave_process_group

    try:
        app()
    except SystemExit as done:
        leave_process_group(wait_for_others=done.code in (0, None))
        raise
    except BaseException:
        leave_process_group(wait_for_others=False)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
