"""How every jaxlens command starts and fails: the shape all entry points share.

An entry point (`jaxlens.train`, `.evaluate`, `.export`, `.trajectory`) defines its flags on its
own `FlagValues` (from `command_flags`, so several commands can be imported into one process, as
the tests do) and a `job(flags) -> None` function, and hands both to `run`. `run` parses the
command line and calls the job; a failure prints one `error: ...` line (and any hint lines the
message carries) on stderr, without a traceback unless `--debug` is given, and returns the exit
status of a Unix tool: 2 for bad usage or bad input (a flag, a config field, a missing or
malformed file), 1 for a run that failed on good input (a non-finite loss, an unreadable
checkpoint), 0 for success.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import flags, logging

USAGE = 2  # bad usage or bad input: the user has something to change
FAILED = 1  # the run itself failed

# Exceptions that mean "the input is wrong": what a user can fix by changing a flag or a file.
# Everything else that escapes a job is a failed run.
_BAD_INPUT = (ValueError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError)


def command_flags() -> flags.FlagValues:
    """A fresh flag set holding the flags every command has (`--debug`, `--verbosity`)."""
    values = flags.FlagValues()
    flags.DEFINE_bool("debug", False, "Show the Python traceback of an error.", flag_values=values)
    flags.DEFINE_enum(
        "verbosity",
        "warning",
        ["debug", "info", "warning", "error"],
        "Log level of jaxlens and the libraries it uses (Orbax logs every save at info).",
        flag_values=values,
    )
    return values


def run(
    values: flags.FlagValues,
    job: Callable[[flags.FlagValues], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parses `argv` (default: `sys.argv`) into `values`, runs `job(values)`; the exit status."""
    argv = list(sys.argv if argv is None else argv)
    program = argv[0].rsplit("/", 1)[-1] if argv else "jaxlens"
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        usage = sys.modules[job.__module__].__doc__ or f"usage: {program} [flags]"
        print(f"{usage.strip()}\n\n{values.get_help()}")
        return 0
    # A second run in one process starts from the defaults again, without the `--config.*`
    # override flags that ml_collections defined for the first.
    for name in [name for name in values if "." in name]:
        delattr(values, name)
    values.unparse_flags()
    # ml_collections reads `--config.*` overrides from sys.argv itself, not from `argv`.
    saved_argv, sys.argv = sys.argv, argv
    try:
        rest = values(argv)
    except Exception as error:  # absl's flag errors, and config files that fail to load
        return _fail(_flag_message(error, argv), hint=f"see {program} --help", status=USAGE)
    finally:
        sys.argv = saved_argv
    if len(rest) > 1:
        return _fail(f"unexpected arguments: {' '.join(rest[1:])}", status=USAGE)
    logging.set_verbosity(values["verbosity"].value)
    try:
        job(values)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if values["debug"].value:
            traceback.print_exc()
        status = USAGE if isinstance(error, _BAD_INPUT) else FAILED
        return _fail(_error_text(error), status=status)
    return 0


def main_of(values: flags.FlagValues, job: Callable[[flags.FlagValues], None]):
    """The console-script function of a command: `sys.exit(run(values, job))`.

    A command's process is jaxlens's own, and jaxlens reads every checkpoint and lens file without
    PyTorch, so transformers is told not to import it (`USE_TORCH=0`, unless the environment says
    otherwise): a command starts 2 s sooner on this project's CPU and never loads torch's memory.
    """

    def main(argv: Sequence[str] | None = None) -> None:
        os.environ.setdefault("USE_TORCH", "0")
        sys.exit(run(values, job, argv))

    return main


def _fail(message: str, *, status: int, hint: str | None = None) -> int:
    lines = message.strip().splitlines() or ["(no message)"]
    lines[0] = f"error: {lines[0]}"
    if hint:
        lines.append(f"hint: {hint}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return status


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])  # str(KeyError) quotes its message
    return str(error) or type(error).__name__


def _flag_message(error: BaseException, argv: Sequence[str]) -> str:
    """The message of a flag-parsing error, in plain words.

    ml_collections reports an unknown config field as the repr of a KeyError inside an
    AttributeError (`'\\'num_stepz\\'\\nDid you mean "num_steps" ...'`); that one is rewritten.
    """
    text = str(error)
    unknown = re.search(r"""\\?'([\w.]+)\\?'.*Did you mean "([\w.]+)" instead""", text, re.S)
    if unknown:
        given, suggested = _config_path(unknown[1], argv), unknown[2]
        parent = given.rpartition(".")[0]
        return f"{given} is not a config field; did you mean {parent}.{suggested}?"
    if isinstance(error, AttributeError) and text.startswith(("'", '"')):
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
        field = _config_path(text.split("\n", 1)[0].strip("'\""), argv)
        return f"{field} is not a config field (see the config file for the fields)."
    return text.removeprefix("flag ")


def _config_path(field: str, argv: Sequence[str]) -> str:
    """The `--config.a.b` override in `argv` whose last part is `field` (ml_collections names
    only the last part)."""
    for arg in argv:
        path = arg.split("=", 1)[0]
        if path.startswith("--config.") and path.rsplit(".", 1)[-1] == field:
            return path
    return f"--config.{field}"
