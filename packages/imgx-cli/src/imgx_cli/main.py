"""Entry point of the `imgx` command: checks the words, runs Fire, reports errors in a line.

Exit codes: 0 done (and help), 1 some inputs of `imgx predict` failed, 2 a user error
(bad command line, unknown dataset or config key, missing run, absent GPU), 130
interrupted. `IMGX_DEBUG=1` shows the traceback of a user error. Any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence

import fire
import fire.core

from imgx_cli import argv as argv_lib
from imgx_cli import commands

PROG = "imgx"


# The back ends' user-error classes, as (module, class) names. They are looked up in
# `sys.modules` when an error arrives: an error of one of them means its module is loaded,
# and `imgx --help` does not have to import JAX to know them.
_BACK_END_USER_ERRORS = (
    ("imgx_data.errors", "DatasetError"),  # unknown / unbuilt dataset, bad raw files
    ("imgx_train.config", "ConfigError"),  # unknown config key, preset or value
    ("imgx_train.runs", "RunError"),  # missing or unwritable run directory
    ("imgx_train.checkpoint", "CheckpointError"),  # no usable checkpoint
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: a command line, dataset, key, run or file.

    Only the project's own error types and `FileExistsError` (a run directory that already
    holds a run); any other exception, a bare ValueError included, is a bug and keeps its
    traceback.
    """
    types: list[type[BaseException]] = [argv_lib.UsageError, FileExistsError]
    for module_name, class_name in _BACK_END_USER_ERRORS:
        error_type = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error_type, type) and issubclass(error_type, BaseException):
            types.append(error_type)
    return tuple(types)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _tidy_help(text: str) -> str:
    """Fire prints `--batch_size` and `Optional[int | None]`; say `--batch-size`, `Optional[int]`.

    Both spellings of a flag work.
    """
    text = re.sub(r"--([a-z0-9_]+)", lambda m: "--" + m.group(1).replace("_", "-"), text)
    return re.sub(r"Optional\[(\w+) \| None\]", r"Optional[\1]", text)


def _display(lines: Sequence[str], out: object = None) -> None:
    """Fire's help, on stdout and without a pager."""
    del out  # Fire sends help to stderr; it is the answer asked for, so stdout.
    sys.stdout.write(_tidy_help("\n".join(lines)) + "\n")
    sys.stdout.flush()


def _display_error(component_trace: fire.core.FireTrace) -> None:
    """Fire's own parse errors as one line instead of a usage screen."""
    message = _one_line(Exception(component_trace.elements[-1].ErrorAsStr()))
    print(f"{PROG}: error: {message} (see `{PROG} --help`)", file=sys.stderr)


@contextlib.contextmanager
def _fire_output() -> Iterator[None]:
    saved = fire.core.Display, fire.core._DisplayError
    fire.core.Display, fire.core._DisplayError = _display, _display_error
    try:
        yield
    finally:
        fire.core.Display, fire.core._DisplayError = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `imgx` on `argv` (default: `sys.argv[1:]`) and returns the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        fire_words = argv_lib.normalize(words, commands.COMMANDS)
        with _fire_output():
            fire.Fire(commands.COMMANDS, command=fire_words, name=PROG)
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    except commands.CommandExit as exit_:
        print(f"{PROG}: {exit_}", file=sys.stderr)
        return exit_.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as error:
        if os.environ.get("IMGX_DEBUG") == "1":
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
