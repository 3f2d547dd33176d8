"""Typed dataclass configs as command-line flags and YAML recipes.

A config field becomes a flag `--field-name` whose help text is the field's `help` metadata, so `--help` documents
every knob and nothing is declared twice. `--config recipe.yaml` sets defaults from a file (keys are the field
names); flags given on the command line win over the recipe.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml

from node.errors import EXIT_USAGE, ConfigError

T = TypeVar("T")


ROLES = ("learner", "sampler")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Iterable[Any] | None = None,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, role: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field with the help text (and choices) its command-line flag shows.

    parse: turns the flag's text into the value (default: the field's type), e.g. "2GB" -> 2000000000.
    role: "learner" or "sampler" when only that program has the flag (a shared config such as SwarmConfig).
    repeat: a list field takes one value per flag, repeated (`--x a --x b`), instead of several after one flag.
    """
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
                "parse": parse, "role": role, "repeat": repeat}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_optional(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Help text per field: `option(help=...)`, else the attribute docstring under the field, else a
    `name: text` line of the class docstring. (Cached: reading a class's source parses its whole module.)"""
    docs: dict[str, str] = {}
    if all(f.metadata.get("help") for f in dataclasses.fields(cls)):
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
    class_doc = inspect.getdoc(cls) or ""
    for match in re.finditer(r"^([a-z_][a-z_0-9 /,]*?):\s+(.+(?:\n\s{4,}.+)*)", class_doc, re.MULTILINE):
        text = " ".join(match.group(2).split())
        for name in re.split(r"[ /,]+", match.group(1)):
            if name:
                docs.setdefault(name, text)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        tree = None
    if tree is not None:
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, *, skip: Iterable[str] = (),
                       prefix: str = "", rename: dict[str, str] | None = None, role: str | None = None,
                       only: Iterable[str] | None = None, choices: dict[str, Iterable[Any]] | None = None) -> None:
    """Add one flag per field of `cls` to an argument group named `title`.

    The flag of field `x` is `--{prefix}x` (underscores as dashes) unless `rename` maps it to another name; its
    destination is always `{prefix}x`, which `dataclass_from_args(..., prefix=prefix)` reads back. With `role`, a
    field marked `option(role=...)` for the other program gets no flag; `only` restricts the fields to those named;
    `choices` gives allowed values for fields that are not `option(...)`s (a dataclass outside node/).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    skipped = set(skip)
    wanted = set(only) if only is not None else None
    rename = rename or {}
    choices = choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skipped or not f.init or (wanted is not None and f.name not in wanted):
            continue
        if role is not None and f.metadata.get("role") not in (None, role):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "").replace("%", "%%")
        if "default:" not in help_text:  # a help text may explain a computed default itself
            help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        flag = "--" + rename.get(f.name, prefix + f.name).replace("_", "-")
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default, "help": help_text}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        allowed = f.metadata.get("choices") or choices.get(f.name)
        if allowed:
            kwargs["choices"] = tuple(allowed)
        if origin in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            item_parse = f.metadata.get("parse") or item
            if f.metadata.get("repeat"):
                group.add_argument(flag, action=_AppendOverDefault, type=item_parse, **kwargs)
            else:
                group.add_argument(flag, nargs="*", type=item_parse, **kwargs)
            continue
        parse = f.metadata.get("parse") or tp
        parse = _parse_optional(parse) if optional else parse
        group.add_argument(flag, type=parse, **kwargs)


class _AppendOverDefault(argparse.Action):
    """A repeatable flag whose values replace the default (or a recipe's list) rather than extend it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is parser.get_default(self.dest) else current
        setattr(namespace, self.dest, [*items, values])


def dataclass_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, prefix + f.name)}
    values.update(overrides)
    return cls(**values)


def program_name(module: str, script: str) -> str:
    """How the user started the program, for --help and messages: the console script or `python -m module`."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: <what> (see prog --help)`, with the usage exit status 2
    (the full usage of a node program is longer than a screen and hides the message)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("usage", "%(prog)s [options]  (every option below; --config RECIPE.yaml for a file of them)")
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: a flat mapping of field names (underscores or dashes) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: a recipe is a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _option_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a recipe key may use for an option: its flag ("loss", "dataset") or its destination
    ("loss_type", "data_source")."""
    names = {a.dest: a for a in parser._actions if a.dest != "help"}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                names[flag[2:].replace("-", "_")] = action
    return names


def _recipe_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A recipe value as the flag would have parsed it: a string for a list option is one item, not its letters;
    strings go through the flag's type; choices are enforced."""
    flag = next((f for f in action.option_strings if f.startswith("--")), key)
    many = action.nargs in ("*", "+") or isinstance(action, _AppendOverDefault)
    if many and not isinstance(value, (list, tuple)):
        value = [] if value is None else [value]
    elif not many and isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: {key} ({flag}) takes one value, got {type(value).__name__} {value!r}")
    items = list(value) if many else [value]
    parse = action.type
    out = []
    for item in items:
        if isinstance(item, str) and parse is not None:
            try:
                item = parse(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{where}: {key} ({flag}): invalid value {item!r}: {exc}") from None
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"{where}: {key} ({flag}): {item!r} is not one of "
                             f"{', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


def parse_with_recipe(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from `--config recipe.yaml` when given; explicit flags win. TRL / open-r1 names
    (node/trl_names.py) are accepted in both."""
    from node.trl_names import TABLE as TRL_TABLE, translate, translate_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    names = _option_names(parser)
    try:
        argv = translate_argv(argv, known=set(names))
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config:
            where = f"--config {known.config}"
            recipe = translate(load_recipe(known.config), where, known=set(names))
            unknown = sorted(k for k in recipe if k not in names)
            if unknown:
                spellings = [*names, *TRL_TABLE]
                hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, spellings, 1))
                         else k for k in unknown]
                raise ConfigError(f"{where}: unknown options: {', '.join(hints)} "
                                  f"(keys are the flag names of {parser.prog} --help)")
            parser.set_defaults(**{names[k].dest: _recipe_value(names[k], k, v, where) for k, v in recipe.items()})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return parser.parse_args(argv)


def add_process_args(parser: argparse.ArgumentParser) -> None:
    """Flags every node program has: a recipe, the log level and torch's thread count."""
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="YAML recipe of option values (keys are option names, or TRL/open-r1 names); flags given "
                             "here win (default: none)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: INFO)")
    parser.add_argument("--torch-threads", type=int, default=0, metavar="N",
                        help="torch intra-op threads (0: torch's default, one per core). Give 1 when several nodes "
                             "share a CPU: threads that outnumber the cores spin at OpenMP barriers and make every "
                             "step many times slower (default: 0)")


def setup_process(args: argparse.Namespace) -> None:
    """Logging and torch threads from `add_process_args`' flags (call first thing in a program's main)."""
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
