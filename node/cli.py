"""Typed dataclass configs as command-line flags and YAML recipes.

A config field becomes a flag `--field-name` whose help text is the field's `help` metadata, so `--help` documents
every knob and nothing is declared twice. `--config recipe.yaml` sets defaults from a file (keys are the field
names); flags given on the command line win over the recipe.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Iterable[Any] | None = None,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING, metavar: str | None = None,
           repeat: bool = False) -> Any:
    """A dataclass field with the help text (and choices) its command-line flag shows. A list field takes several
    values after one flag (`--x a b`), or with `repeat=True` one value per flag, repeated (`--x a --x b`)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
                "repeat": repeat}
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


def field_docs(cls: type) -> dict[str, str]:
    """Help text per field: `option(help=...)`, else the attribute docstring under the field, else a
    `name: text` line of the class docstring."""
    docs: dict[str, str] = {}
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
                       prefix: str = "", rename: dict[str, str] | None = None) -> None:
    """Add one flag per field of `cls` to an argument group named `title`.

    The flag of field `x` is `--{prefix}x` (underscores as dashes) unless `rename` maps it to another name; its
    destination is always `{prefix}x`, which `dataclass_from_args(..., prefix=prefix)` reads back.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    skipped = set(skip)
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skipped or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "").replace("%", "%%")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        flag = "--" + rename.get(f.name, prefix + f.name).replace("_", "-")
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default, "help": help_text}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if origin in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            if f.metadata.get("repeat"):
                group.add_argument(flag, action=_AppendOverDefault, type=item, **kwargs)
            else:
                group.add_argument(flag, nargs="*", type=item, **kwargs)
            continue
        parse = _parse_optional(tp) if optional else tp
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


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: a flat mapping of field names (underscores or dashes) to values."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"error: recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: recipe {path} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_with_recipe(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from `--config recipe.yaml` when given; explicit flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        recipe = load_recipe(known.config)
        # A recipe key may be a flag's name ("loss", "dataset") or its destination ("loss_type", "data_source").
        names = {a.dest: a.dest for a in parser._actions}
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    names[flag[2:].replace("-", "_")] = action.dest
        unknown = sorted(k for k in recipe if k not in names)
        if unknown:
            raise SystemExit(f"error: recipe {known.config} has unknown options: {', '.join(unknown)}")
        parser.set_defaults(**{names[k]: v for k, v in recipe.items()})
    return parser.parse_args(argv)


def add_process_args(parser: argparse.ArgumentParser) -> None:
    """Flags every node program has: a recipe, the log level and torch's thread count."""
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="YAML recipe of option values (keys are option names); flags given here win")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument("--torch-threads", type=int, default=0, metavar="N",
                        help="torch intra-op threads (0: torch's default, one per core). Give 1 when several nodes "
                             "share a CPU: threads that outnumber the cores spin at OpenMP barriers and make every "
                             "step many times slower")


def setup_process(args: argparse.Namespace) -> None:
    """Logging and torch threads from `add_process_args`' flags (call first thing in a program's main)."""
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
