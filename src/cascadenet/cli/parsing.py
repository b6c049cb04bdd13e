"""Reading the command line. tyro parses the verb's dataclass; whatever it rejects (an unknown verb or option, a
missing argument, a bad value) becomes a ``UsageError`` whose message is one line naming the problem, in place of
tyro's box (which, for a typo, suggested the flags of every verb)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import itertools
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import tyro

from .commands import VERBS, command_spec

__all__ = ["UsageError", "parse", "verb_flags"]

DESCRIPTION = "Train, evaluate and plot parallel cascaded ResNets for anytime prediction."


class UsageError(ValueError):
    """A command line that cannot be parsed; the message is the line to print."""

    reported_by_rank0 = True  # under torchrun every process parses the same line: rank 0 speaks for all


def parse(argv: Sequence[str]) -> Any | None:
    """The command that ``argv`` (the words after ``cascadenet``) describes, or None when it asked for --help
    (tyro has printed it).

    Raises:
        UsageError: the line cannot be parsed (nothing was run).
    """
    verb = _verb(argv)
    if verb is not None:
        argv = [argv[0], *_flag_pairs(argv[1:], verb)]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), _on_parse_error(lambda event: _raise_usage(event, argv, verb)):
            cmd = tyro.cli(command_spec(argv), args=argv, prog="cascadenet", description=DESCRIPTION,
                           config=(tyro.conf.OmitSubcommandPrefixes,))  # fmt: skip
    except SystemExit as e:
        if not e.code:
            return None  # --help
        raise UsageError(_unknown_option(argv, verb) or _squeezed(captured.getvalue())) from None
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return cmd


def _verb(argv: Sequence[str]) -> type | None:
    """The command class of the line's verb; None for a line that starts with an option (``--help``)."""
    if not argv:
        raise UsageError(f"missing command: one of {', '.join(VERBS)} (see cascadenet --help)")
    if argv[0].startswith("-"):
        return None
    if argv[0] not in VERBS:
        close = difflib.get_close_matches(argv[0], VERBS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(VERBS)}"
        raise UsageError(f"unknown command {argv[0]!r} ({hint})")
    return VERBS[argv[0]]


# ---- the flags of a verb, read from its dataclass as tyro makes them ----------------------------------------------


def _fields(cls: type) -> Iterator[tuple[str, Any, tuple[Any, ...]]]:
    """(name, type, Annotated metadata) of each field of a command that is a flag; a nested dataclass (the model
    flags, whose prefix is omitted) gives its own fields."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        meta = getattr(kind, "__metadata__", ())
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
        if any(m is tyro.conf.Positional or m is tyro.conf.Suppress for m in meta):
            continue
        if dataclasses.is_dataclass(base):
            yield from _fields(base)  # type: ignore[arg-type]
        else:
            yield f.name, base, meta


def _is_bool(kind: Any) -> bool:
    return kind is bool or _is_tristate(kind)


def _is_tristate(kind: Any) -> bool:
    return set(typing.get_args(kind)) == {bool, type(None)}


def verb_flags(cls: type) -> list[str]:
    """Every flag of a command: ``--name`` per field, ``--no-name`` too for a boolean, aliases (``-o``)."""
    flags = ["-h", "--help"]
    for name, kind, meta in _fields(cls):
        flags.append("--" + name.replace("_", "-"))
        if _is_bool(kind):
            flags.append("--no-" + name.replace("_", "-"))
        flags += [alias for m in meta for alias in (getattr(m, "aliases", None) or ())]
    return flags


_VALUES = {"True": True, "False": False, "None": None}


def _flag_pairs(args: Sequence[str], cls: type) -> list[str]:
    """The value forms that the tri-state options took before they became flag pairs (``--amp False``,
    ``--amp=True``, ``--amp None``), rewritten as ``--no-amp``, ``--amp`` and nothing (the automatic choice)."""
    tristates = {"--" + name.replace("_", "-") for name, kind, _ in _fields(cls) if _is_tristate(kind)}
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return [*out, arg, *rest]
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-")
        if flag not in tristates or (not eq and (not rest or rest[0] not in _VALUES)):
            out.append(arg)
            continue
        value = value if eq else rest.pop(0)
        if value not in _VALUES:
            out.append(arg)  # --amp=maybe: tyro refuses it
        elif _VALUES[value] is not None:
            out.append(flag if _VALUES[value] else "--no-" + flag[2:])
    return out


# ---- tyro's parse errors as one line ------------------------------------------------------------------------------


@contextlib.contextmanager
def _on_parse_error(hook: Callable[[Any], None]) -> Iterator[None]:
    """tyro's hook on parse errors (tyro >= 1.0.14; private and experimental, so used where present: without
    it, the error is tyro's box squeezed onto one line)."""
    try:
        register = importlib.import_module("tyro._errors").on_parse_error
    except (ImportError, AttributeError):
        yield
        return
    with register(hook):
        yield


def _raise_usage(event: Any, argv: Sequence[str], verb: type | None) -> None:
    try:
        message = _describe(event, argv, verb)
    except Exception:  # the event's payload is tyro's internal types: if they changed, tyro's own message
        return
    if message:
        raise UsageError(message)


def _describe(event: Any, argv: Sequence[str], verb: type | None) -> str | None:
    """One line for a parse-error event of tyro; None for one not handled here."""
    kind = type(event).__name__
    if kind == "UnrecognizedArgs":
        return _unrecognized(event.tokens, verb)
    if kind == "MissingArgs":
        names = ", ".join(_name(a.arg) for a in event.missing_arguments)
        return f"missing {names} ({_see(verb)})"
    if kind == "InvalidChoice":
        return f"{_name(event.argument)}: invalid choice {event.value!r} (choose from {', '.join(event.choices)})"
    if kind == "BadValue" and event.reason == "too_few_values":
        return f"{_name(event.argument)}: missing value (expected {_metavar(event.argument)})"
    if kind == "InstantiationFailure":
        if event.argument is None:
            return " ".join(str(event.message).split())
        value = _value(argv, event.argument.lowered.name_or_flags)
        if value is None:
            return f"{_name(event.argument)}: {str(event.message).strip().splitlines()[0]}"
        return f"{_name(event.argument)}: invalid value {value!r} (expected {_metavar(event.argument)})"
    return None


def _unrecognized(tokens: Sequence[str], verb: type | None) -> str:
    options = [t for t in tokens if t.startswith("-") and not _is_number(t)]
    if options:
        return _unknown(options[0], verb)
    return f"unexpected argument {tokens[0]!r} ({_see(verb)})"


def _unknown(token: str, verb: type | None) -> str:
    """``unknown option --epoch (did you mean --epochs?)``: suggestions from the verb's own flags only."""
    flag = token.partition("=")[0]
    known = verb_flags(verb) if verb is not None else ["-h", "--help"]
    close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
    return f"unknown option {flag} ({f'did you mean {close[0]}?' if close else _see(verb)})"


def _unknown_option(argv: Sequence[str], verb: type | None) -> str | None:
    """The first option of the line that its verb lacks, described as ``_unknown`` does (for a tyro without the
    parse-error hook)."""
    if verb is None:
        return None
    known = set(verb_flags(verb))
    for arg in itertools.takewhile(lambda a: a != "--", argv[1:]):
        if arg.startswith("--") and arg.partition("=")[0].replace("_", "-") not in known:
            return _unknown(arg, verb)
    return None


def _see(verb: type | None) -> str:
    name = next((n for n, cls in VERBS.items() if cls is verb), None)
    return f"see cascadenet {name} --help" if name else "see cascadenet --help"


def _name(arg: Any) -> str:
    """How the user writes an argument: its metavar if positional (RUN_DIR), else its long flag."""
    if arg.is_positional():
        return str(arg.lowered.metavar)
    return max(arg.lowered.name_or_flags, key=len)


def _metavar(arg: Any) -> str:
    """The argument's type as tyro's help shows it, without the {None} that the options' defaults add."""
    text = re.sub(r"\{None\}\||\|\{None\}", "", str(arg.lowered.metavar))
    return text[1:-1] if re.fullmatch(r"\{[^{},]*\}", text) else text


def _value(argv: Sequence[str], flags: Sequence[str]) -> str | None:
    """The value typed after the last of ``flags`` on the line (its words up to the next option)."""
    for i in reversed(range(len(argv))):
        flag, eq, value = argv[i].partition("=")
        if flag.replace("_", "-") in flags:
            return value if eq else " ".join(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1 :]))
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _squeezed(box: str) -> str:
    """tyro's boxed error on one line: the box, its colours and its pointer to --help removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", box)
    text = " ".join(re.sub(r"[╭╮╰╯│─]+", " ", text).split())
    text = re.sub(r" ?For full helptext, (run|see):? \S.*?--help", "", text)
    return text or "the command line could not be parsed (see cascadenet --help)"
