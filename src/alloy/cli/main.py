"""Entry point of the `alloy` command: the app, global options and error handling.

Exit codes: 0 success, 2 bad input (an `InputError` or a usage error), 1 any other failure,
130 interrupted. Tracebacks are printed only with `-v`.
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer import _click
from typer.core import TyperGroup

import alloy
from alloy.cli import _terminate
from alloy.errors import AlloyError


class _InterruptedError(Exception):
    """A Ctrl-C or SIGTERM inside a command, carried past typer (which would make it Exit(130))."""


class _Group(TyperGroup):
    def invoke(self, ctx: _click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _InterruptedError() from exc


app = typer.Typer(
    cls=_Group,
    name="alloy",
    help="Combine and adapt foundation-model checkpoints (Hugging Face folders in and out).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Options shared by several commands, declared once so their help reads the same everywhere.
FORCE = typer.Option("--force", help="Replace a non-empty output folder (only once done).")
ALLOW_PICKLE = typer.Option(
    "--allow-pickle", help="Read PyTorch .bin (pickle) weights; only for files you trust."
)
# Evaluation options, shared by `alloy eval` and every command that scores models.
WINDOW = typer.Option(help="Tokens per window (default: the model's context).")
STRIDE = typer.Option(help="Tokens between windows (default: half the window).")
BATCH_SIZE = typer.Option(help="Sequences per forward pass.")
MAX_TOKENS = typer.Option(help="Score at most this many tokens of each text set.")
MAX_ITEMS = typer.Option(help="Score at most this many items of each choice/preference set.")
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    verbose = False
    # What an interrupt at this point leaves on disk; a command that keeps something says so.
    kept = "nothing was written"


def on_interrupt(kept: str) -> None:
    """Say what a Ctrl-C from now on keeps, for the one line printed when it comes."""
    _State.kept = kept


def _interrupted(argv: list[str], exc: BaseException) -> int:
    words = [a for a in argv if not a.startswith("-")][:1]
    what = f"alloy {words[0]}" if words else "alloy"
    how = "terminated" if str(exc).startswith("signal") else "interrupted"
    stderr.print(f"{how}: {what} stopped; {_State.kept}", markup=False)
    return 130


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"alloy {alloy.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    _State.verbose = verbose


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info logs (commands print their own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _register() -> None:
    # Commands live in their own modules and attach themselves to `app` on import.
    from alloy.cli import average as _average  # noqa: F401
    from alloy.cli import eval as _eval  # noqa: F401
    from alloy.cli import generate as _generate  # noqa: F401
    from alloy.cli import improve as _improve  # noqa: F401
    from alloy.cli import inspect as _inspect  # noqa: F401
    from alloy.cli import lab as _lab  # noqa: F401
    from alloy.cli import lora as _lora  # noqa: F401
    from alloy.cli import lora_extract as _lora_extract  # noqa: F401
    from alloy.cli import lora_merge as _lora_merge  # noqa: F401
    from alloy.cli import merge as _merge  # noqa: F401
    from alloy.cli import moe as _moe  # noqa: F401
    from alloy.cli import prefs as _prefs  # noqa: F401
    from alloy.cli import soup as _soup  # noqa: F401
    from alloy.cli import train as _train  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    args = sys.argv[1:] if argv is None else argv
    _State.verbose = False
    _State.kept = "nothing was written"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _register()  # imports torch: a Ctrl-C here is an interrupt like any other
        result = app(args=args, prog_name="alloy", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except _InterruptedError as exc:
        return _interrupted(args, exc.__cause__ or exc)
    except typer.TyperException as exc:  # usage errors: typer prints them with a hint
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            stderr.print(f"error: {exc.format_message()}", markup=False)
        return exc.exit_code
    except typer.Abort as exc:
        return _interrupted(args, exc.__cause__ or exc)
    except AlloyError as exc:
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        if _State.verbose:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(args, exc)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT or exc.filename is None:
            return _internal(exc)
        from alloy.io.atomic import user_path

        where = user_path(exc.filename)
        hint = _ENVIRONMENT[exc.errno]
        stderr.print(f"error: {where}: {exc.strerror} ({hint}); nothing was kept", markup=False)
        if _State.verbose:
            traceback.print_exc()
        return 2
    except Exception as exc:
        return _internal(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


# Failures of the machine rather than of alloy: reported with the user's path and a fix, exit 2.
_ENVIRONMENT = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "the filesystem is read-only; choose another output path",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder; give a file",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the disk reported an I/O error; check the device",
}


def _internal(exc: BaseException) -> int:
    stderr.print(
        f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", markup=True
    )
    if _State.verbose:
        traceback.print_exc()
    else:
        stderr.print("run again with -v for the traceback, and please report it")
    return 1
