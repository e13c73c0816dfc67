"""Checks and normalises the words of a command line before Fire sees them.

Fire reads any word it cannot bind as a call on the command's *return value*, so an
unknown flag (`imgx train --stpes 10`) would start a training run and fail only after it.
These checks run first, against each command's signature, and turn every mistake into one
`UsageError`. They also add the spellings Fire lacks: `--no-test` for a boolean, `-h`
anywhere for help, and `--key=value` as the single form handed on, so that Fire never
guesses whether the next word is a value.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence

HELP_FLAGS = ("-h", "--help")
_SHORT_FLAG = re.compile(r"^-[a-zA-Z](=|$)")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


class UsageError(Exception):
    """A command line that does not fit the command; the message says what to type."""


def dashed(name: str) -> str:
    """`batch_size` -> `--batch-size`, the spelling users type."""
    return "--" + name.replace("_", "-")


def is_flag(word: str) -> bool:
    """Fire's rule: `--name[=v]` or `-x[=v]`; `-1` and `-abc` are values."""
    return (word.startswith("--") and len(word) > 2) or bool(_SHORT_FLAG.match(word))


def _suggestion(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse_bool(text: str, option: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise UsageError(f"{option} takes true or false, got {text!r}")


def _keyword(word: str, command: str, names: Sequence[str], short: Mapping[str, str] = {}) -> str:
    """The parameter a flag word names: exact (dashes or underscores), the command's own
    short flag (`fn.SHORT_FLAGS`, e.g. `-o` for `--output` beside `--overwrite`) or a
    unique initial."""
    key = word.lstrip("-").partition("=")[0].replace("-", "_")
    if word.startswith("--") and key in names:
        return key
    if not word.startswith("--") and key in short:
        return short[key]
    if not word.startswith("--"):
        matches = [name for name in names if name.startswith(key)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            options = ", ".join(dashed(m) for m in matches)
            raise UsageError(f"-{key} is ambiguous for `imgx {command}`: {options}")
    options = [dashed(name) for name in names]
    raise UsageError(
        f"unknown option {word.partition('=')[0]} for `imgx {command}`"
        f"{_suggestion(dashed(key), options)}; options: {', '.join(options)}"
    )


def normalize_command(command: str, words: Sequence[str], fn: Callable[..., object]) -> list[str]:
    """Checks the words after a command name and returns them as Fire should get them.

    Every option comes out as `--name=value` (booleans as `--name=True`/`False`), followed
    by the positional words; `-h`/`--help` anywhere gives `["--", "--help"]`.

    Raises:
      UsageError: unknown or ambiguous option, option without its value, bad boolean,
        unexpected or missing positional argument.
    """
    if any(word in HELP_FLAGS for word in words):
        return ["--", "--help"]
    signature = inspect.signature(fn).parameters
    params = {n: p for n, p in signature.items() if p.kind is not p.VAR_POSITIONAL}
    takes_any = len(params) < len(signature)  # `*runs`: any number of positional words
    names = list(params)
    bools = {name for name, p in params.items() if isinstance(p.default, bool)}
    options: list[str] = []
    given: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not is_flag(word):
            positional.append(word)
            continue
        key = word.lstrip("-").partition("=")[0].replace("-", "_")
        has_equals = "=" in word
        next_is_value = not has_equals and i < len(words) and not is_flag(words[i])
        negated = key[3:] if key.startswith("no_") else key[2:]
        if word.startswith("--") and key not in names and negated in bools:
            if has_equals:
                raise UsageError(f"{word.partition('=')[0]} takes no value")
            options.append(f"--{negated}=False")
            given.add(negated)
            continue
        name = _keyword(word, command, names, getattr(fn, "SHORT_FLAGS", {}))
        if name in given:
            hint = ' (all overrides go in one: --set "a.b=1,c.d=2")' if name == "set" else ""
            raise UsageError(f"{dashed(name)} is given twice{hint}")
        given.add(name)
        if has_equals:
            value = word.partition("=")[2]
        elif name in bools:
            if next_is_value and words[i].lower() in _TRUE + _FALSE:
                value = words[i]
                i += 1
            else:
                value = "true"
        elif next_is_value:
            value = words[i]
            i += 1
        else:
            raise UsageError(f"{dashed(name)} needs a value (see `imgx {command} --help`)")
        if name in bools:
            value = str(_parse_bool(value, dashed(name)))
        options.append(f"--{name}={value}")
    required = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty and name not in given
    ]
    if len(positional) > len(required) and not takes_any:
        extra = positional[len(required)]
        raise UsageError(f"unexpected argument {extra!r} for `imgx {command}`")
    if len(positional) < len(required):
        missing = required[len(positional)]
        raise UsageError(f"`imgx {command}` needs <{missing}> (see `imgx {command} --help`)")
    return options + positional


def normalize(words: Sequence[str], commands: Mapping[str, Callable[..., object]]) -> list[str]:
    """Checks a whole command line (without the program name); see `normalize_command`.

    No words or a help flag first gives the top-level help, `--version` the version.
    """
    if not words or words[0] in HELP_FLAGS:
        return ["--", "--help"]
    if words[0] == "--version":
        return ["version"]
    command, rest = words[0], words[1:]
    if is_flag(command):
        raise UsageError(
            f"the command comes first, e.g. imgx train {command}; commands: {', '.join(commands)}"
        )
    if command not in commands:
        raise UsageError(
            f"unknown command {command!r}{_suggestion(command, list(commands))}; "
            f"commands: {', '.join(commands)}"
        )
    return [command, *normalize_command(command, rest, commands[command])]
