"""The `clipa` command: parses arguments, calls the plain-Python core, renders the result."""


def main() -> None:
    """The console script's entry point (`clipa = "clipa.cli:main"`), kept here so installs made
    before the CLI became a package keep working; the commands live in clipa.cli.app."""
    from clipa.cli.app import main as run

    run()
