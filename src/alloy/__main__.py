"""`python -m alloy` runs the command line."""

from alloy.cli import run

if __name__ == "__main__":
    run()
