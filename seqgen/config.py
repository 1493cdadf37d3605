"""Typed dataclass configs: to/from plain dicts (checkpoints, YAML) and to/from CLI flags.

One implementation for every task: a config section is a dataclass, a YAML file has the same keys,
and `add_dataclass_flags` turns the same fields into `--flags` so the two can never drift apart.

A config documents its fields in its docstring, one `name: what it means` line each (more-indented lines
continue it), the way every dataclass in seqgen documents its fields:

    @dataclass
    class TrainConfig:
        '''How the Trainer trains ...

        lr:        peak learning rate (AdamW), reached at the end of the warmup
        '''
        lr: float = 2e-3

`field_docs` reads those lines, so the sentence a reader sees in the code is the `--lr` help. The value a
flag takes is named by its type: N (int), X (float), BOOL, the choices of a Literal, and for strings the
`File`, `Folder`, `Name` and `Device` annotations below (FILE, DIR, NAME, DEVICE).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from seqgen.errors import SeqgenError

T = TypeVar("T")

# String fields that name something: the annotation is what --help shows as the flag's value.
File = Annotated[str, "FILE"]
Folder = Annotated[str, "DIR"]
Name = Annotated[str, "NAME"]
Device = Annotated[str, "DEVICE"]


def to_dict(cfg: Any) -> dict:
    """A dataclass (nested) as a plain dict of str/int/float/bool/None/list/dict."""
    return dataclasses.asdict(cfg)


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(name: str, tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise SeqgenError(f"{where}: {name} must be one of {choices}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _check_value(name, args[0], value, where)
        for a in args:  # e.g. "RNNEncoderConfig | CNNEncoderConfig" is resolved by the caller
            try:
                return _check_value(name, a, value, where)
            except SeqgenError:
                continue
        raise SeqgenError(f"{where}: {name} has an invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SeqgenError(f"{where}: {name} must be a mapping")
        return from_dict(tp, value, where=f"{where}.{name}" if where else name)
    if tp is bool:
        if not isinstance(value, bool):
            raise SeqgenError(f"{where}: {name} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SeqgenError(f"{where}: {name} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SeqgenError(f"{where}: {name} must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise SeqgenError(f"{where}: {name} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, *, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrongly typed values by name."""
    hints = _resolved_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SeqgenError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _check_value(k, hints[k], v, where) for k, v in data.items()}
    return cls(**kwargs)


# -- CLI flags -------------------------------------------------------------------------------------
def _flag_type(tp: Any):
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
        origin = get_origin(tp)
    if origin is Literal:
        return str, [str(a) for a in get_args(tp)]
    if tp is bool:
        return "bool", None
    return tp, None


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_FIELD_DOC = re.compile(r"^(\w+):\s+(\S.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its documentation: the `name: text` lines of `cls`'s docstring (see the module docstring),
    continuation lines joined. Fields without such a line are absent."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _FIELD_DOC.match(line)
        if match and match.group(1) in names:
            current = docs.setdefault(match.group(1), [])
            current.append(match.group(2).strip())
        elif current is not None and line[:1].isspace() and line.strip():
            current.append(line.strip())
        else:
            current = None
    return {name: " ".join(parts) for name, parts in docs.items()}


def _summary(cls: type) -> str | None:
    """The first line of a hand-written class docstring (dataclasses make one up: "Name(field: type, ...)")."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return doc.splitlines()[0] if doc and not doc.startswith(f"{cls.__name__}(") else None


def _metavar(tp: Any) -> str | None:
    """How --help names a flag's value: a File/Folder/Name/Device annotation, else N, X or TEXT by type (None
    for a Literal, whose choices argparse shows)."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    for a in args:
        if get_origin(a) is Annotated:
            return a.__metadata__[0]
    plain = args[0] if args else tp
    if get_origin(plain) is Literal:
        return None
    return {int: "N", float: "X", bool: "BOOL"}.get(plain, "TEXT")


def _shown(value: Any) -> str:
    """A default as the user would type it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                        dest_prefix: str, skip: tuple[str, ...] = (), defaults: Any = None) -> None:
    """Add one `--{prefix}{field}` flag per field of `cls`, in a group of their own, each with its field's
    documentation as help. Defaults are suppressed so that only flags the user typed override the YAML
    file; `defaults` (an instance: what the command really uses) is what --help shows."""
    hints = _resolved_types(cls)
    extras = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{dest_prefix} ({cls.__name__})", description=_summary(cls))
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp, choices = _flag_type(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
        # None and "" are explained by the field's documentation ("" = every captioned image, ...)
        shown = f"(default: {_shown(default)})" if default not in (None, "") else ""
        doc = " ".join(part for part in (docs.get(f.name, ""), shown) if part).replace("%", "%%")
        if tp == "bool":
            group.add_argument(flag, dest=f"{dest_prefix}.{f.name}", type=_parse_bool, nargs="?", const=True,
                               default=argparse.SUPPRESS, metavar="BOOL", help=doc)
        else:
            group.add_argument(flag, dest=f"{dest_prefix}.{f.name}", type=tp, choices=choices,
                               default=argparse.SUPPRESS, metavar=_metavar(extras[f.name]), help=doc)


def add_run_flags(parser: argparse.ArgumentParser, run_cls: type, *, prefixes: dict[str, str] | None = None,
                  skip: dict[str, tuple[str, ...]] | None = None) -> None:
    """Flags for every section (a dataclass field) of a task's run config, with the run's own defaults.

    prefixes: section -> flag prefix (e.g. {"encoder": "enc-"}); sections without one are unprefixed.
    """
    defaults = run_cls()
    hints = _resolved_types(run_cls)
    for f in dataclasses.fields(run_cls):
        add_dataclass_flags(parser, hints[f.name], prefix=(prefixes or {}).get(f.name, ""), dest_prefix=f.name,
                            skip=(skip or {}).get(f.name, ()), defaults=getattr(defaults, f.name))


def build_run_config(run_cls: type[T], args: argparse.Namespace) -> tuple[T, dict]:
    """The run config from: the task's defaults < the --config YAML file < the flags typed.

    Returns the config and the overrides (YAML + flags) so a resumed run can apply them over its saved config.
    """
    path = getattr(args, "config", None)
    overrides = merge(load_yaml(path) if path else {}, flags_to_dict(args))
    # Merging over the full default dict keeps a task's section defaults (e.g. the LM's 2-layer decoder)
    # when only some keys of a section are given.
    return from_dict(run_cls, merge(to_dict(run_cls()), overrides), where=path or "flags"), overrides


def flags_to_dict(args: argparse.Namespace) -> dict:
    """Collect `section.field` flags the user typed into a nested dict {section: {field: value}}."""
    out: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: values in `override` win."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str) -> dict:
    """Read a YAML config file into a dict (one clear error line if it is not a mapping)."""
    import yaml

    from seqgen.data.text import read_text
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SeqgenError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SeqgenError(f"{path}: a config file must be a mapping of keys to values")
    return data
