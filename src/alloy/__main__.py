"""`python -m alloy` runs the command line."""

from alloy.cli.main import run

if __name__ == "__main__":
    run()
