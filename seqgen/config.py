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

Validation, in one place: a number field declares the values it may take in its annotation (`Bounds`, or an
alias such as `Width` or `Rate`), every float must be finite, and a config with rules between its fields has a
`cross_check()` method. `from_dict` (YAML, flags, checkpoints) and `validate` (a config built in code) check
every field of every section that way, so nothing reads a config that was not checked, and a bad value is one
line naming its key (or its flag) and the allowed range.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from seqgen.errors import SeqgenError, cut_repr

T = TypeVar("T")

# String fields that name something: the annotation is what --help shows as the flag's value.
File = Annotated[str, "FILE"]
Folder = Annotated[str, "DIR"]
Name = Annotated[str, "NAME"]
Device = Annotated[str, "DEVICE"]
Model = Annotated[str, "MODEL"]     # a checkpoint file or the name of a shipped model

# What a config may ask for (docs/reliability.md, "Second hostile review"): beyond these a value is a typo or an
# attack, not a model seqgen can build in memory (seqgen.model also bounds the parameter count).
MAX_WIDTH = 65_536           # embedding, hidden and attention sizes
MAX_LAYERS = 64              # stacked RNN layers
MAX_TOKENS = 10_000          # the longest sequence seqgen generates, or trains on (every max_len)
MAX_VOCAB = 1_000_000        # vocabulary sizes and caps
MAX_CONFIG_BYTES = 1 << 20   # a --config file
MAX_CONFIG_VALUES = 10_000   # values in a --config file, counting each use of a YAML alias


@dataclass(frozen=True)
class Bounds:
    """The values a number field may take, declared in its annotation: `hidden: Annotated[int, Bounds(1, 512)]`.

    low/high: inclusive limits (None = none), exclusive where low_open/high_open. Floats must also be finite.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: float) -> str | None:
        """None if `value` is inside, else what is wrong ("must be >= 1, got 0")."""
        low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self}, got {cut_repr(value)}" if low or high else None

    def __str__(self) -> str:
        def num(x: float) -> str:
            return f"{x:,}" if isinstance(x, int) else f"{x:g}"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"between {num(self.low)} and {num(self.high)}"
        parts = [f"{op} {num(x)}" for x, op in ((self.low, ">" if self.low_open else ">="),
                                                  (self.high, "<" if self.high_open else "<=")) if x is not None]
        return " and ".join(parts)


# The common kinds of number field.
Positive = Annotated[int, Bounds(1)]                       # counts, intervals, batch sizes
Count = Annotated[int, Bounds(0)]                          # 0 = none / off
Width = Annotated[int, Bounds(1, MAX_WIDTH)]               # embedding and hidden sizes
Layers = Annotated[int, Bounds(1, MAX_LAYERS)]
Tokens = Annotated[int, Bounds(1, MAX_TOKENS)]             # max_len
Rate = Annotated[float, Bounds(0.0, 1.0, high_open=True)]  # dropout, label smoothing, averaging decay: [0, 1)
NonNegative = Annotated[float, Bounds(0.0)]
Seed = Annotated[int, Bounds(0, 2**32 - 1)]


class ConfigValueError(SeqgenError):
    """A config value that is wrong: its key path in the config, what is wrong with it, and where the config
    came from (a YAML file, a checkpoint; None = flags or code, then the key is named as its flag)."""

    def __init__(self, path: tuple[str, ...], problem: str, where: str | None = None, flag: str | None = None):
        self.path, self.problem, self.where, self.flag = path, problem, where, flag
        if flag is not None:
            message = f"{flag} {problem}"
        elif where is None:
            message = f"--{path[-1].replace('_', '-')} {problem}" if path else problem
        else:
            message = f"{where}: {'.'.join(path)} {problem}" if path else f"{where}: {problem}"
        super().__init__(message)

    def inside(self, section: str) -> ConfigValueError:
        return ConfigValueError((section, *self.path), self.problem)

    def located(self, where: str | None) -> ConfigValueError:
        return ConfigValueError(self.path, self.problem, where)

    def as_flag(self, flag: str) -> ConfigValueError:
        return ConfigValueError(self.path, self.problem, self.where, flag)


def to_dict(cfg: Any) -> dict:
    """A dataclass (nested) as a plain dict of str/int/float/bool/None/list/dict."""
    return dataclasses.asdict(cfg)


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """The fields' types with their annotations (Bounds, FILE, ...)."""
    return typing.get_type_hints(cls, include_extras=True)


def _key(key: Any) -> str:
    """A key as a message shows it."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isidentifier() else cut_repr(key, 40)


def _check(tp: Any, value: Any) -> Any:
    """`value` checked against type `tp` (and its Bounds), converted where needed (an int for a float);
    ConfigValueError with the path below this value."""
    bounds = None
    if get_origin(tp) is Annotated:
        bounds = next((m for m in tp.__metadata__ if isinstance(m, Bounds)), None)
        tp = tp.__origin__
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigValueError((), f"must be one of {', '.join(map(str, get_args(tp)))}, got {cut_repr(value)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _check(args[0], value)
        for a in args:  # e.g. "RNNEncoderConfig | CNNEncoderConfig" is resolved by the caller
            try:
                return _check(a, value)
            except SeqgenError:
                continue
        raise ConfigValueError((), f"has an invalid value {cut_repr(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            _validate(value)
            return value
        if not isinstance(value, dict):
            raise ConfigValueError((), f"must be a mapping of keys to values, got {cut_repr(value)}")
        return _build(tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigValueError((), f"must be true or false, got {cut_repr(value)}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError((), f"must be an integer, got {cut_repr(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError((), f"must be a number, got {cut_repr(value)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigValueError((), f"must be a finite number, got {cut_repr(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigValueError((), f"must be a string, got {cut_repr(value)}")
    if bounds is not None and (problem := bounds.problem(value)):
        raise ConfigValueError((), problem)
    return value


def _field(name: str, tp: Any, value: Any) -> Any:
    try:
        return _check(tp, value)
    except ConfigValueError as e:
        raise e.inside(name) from None


def _cross_check(cfg: Any) -> None:
    """The rules between a config's fields, if it has any (its `cross_check()` method)."""
    rules = getattr(cfg, "cross_check", None)
    if rules is not None:
        rules()


def _build(cls: type[T], data: dict) -> T:
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]   # (a key that is not a string is never a field's name)
    if unknown:
        more = f" (nor are {len(unknown) - 1} other key(s))" if len(unknown) > 1 else ""
        raise ConfigValueError((_key(unknown[0]),), f"is not a known key{more}; known: {', '.join(names)}")
    obj = cls(**{k: _field(k, types_[k], v) for k, v in data.items()})
    _cross_check(obj)
    return obj


def _validate(cfg: Any) -> None:
    types_ = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        _field(f.name, types_[f.name], getattr(cfg, f.name))
    _cross_check(cfg)


def from_dict(cls: type[T], data: dict, *, where: str | None = "config") -> T:
    """Build dataclass `cls` from a dict and validate it (see the module docstring): unknown keys, wrongly typed
    values and values out of bounds are refused by name. where: the config's source for messages (a file, a
    checkpoint); None = flags (a key is named as its flag)."""
    try:
        if not isinstance(data, dict):
            raise ConfigValueError((), f"must be a mapping of keys to values, got {cut_repr(data)}")
        return _build(cls, data)
    except ConfigValueError as e:
        raise e.located(where) from None


def file_fields(cls: type) -> list[str]:
    """The fields of `cls` that name a file (annotated `File`)."""
    return [name for name, tp in _field_types(cls).items()
            if any(get_origin(a) is Annotated and "FILE" in a.__metadata__ for a in (tp, *get_args(tp)))]


def validate(cfg: T, *, where: str | None = None) -> T:
    """Check every field of `cfg` (a dataclass config built in code), its sections and their rules, as
    `from_dict` does; returns `cfg`. where: as for `from_dict`."""
    try:
        _validate(cfg)
    except ConfigValueError as e:
        raise e.located(where) from None
    return cfg


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
        if get_origin(a) is Annotated and (names := [m for m in a.__metadata__ if isinstance(m, str)]):
            return names[0]
    plain = args[0] if args else tp
    if get_origin(plain) is Annotated:     # Bounds: named by the type
        plain = plain.__origin__
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
    flag_names = dict(parser.get_default("flag_names") or {})   # for errors about a value typed as a flag
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp, choices = _flag_type(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        flag_names[f"{dest_prefix}.{f.name}"] = flag
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
    parser.set_defaults(flag_names=flag_names)


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
    """The run config from: the task's defaults < the --config YAML file < the flags typed, validated.

    Returns the config and the overrides (YAML + flags) so a resumed run can apply them over its saved config.
    A bad value is named as the flag the user typed, or as its key in the YAML file.
    """
    path = getattr(args, "config", None)
    given = load_yaml(path) if path else {}
    flags = flags_to_dict(args)
    sections = _resolved_types(run_cls)
    for key, value in given.items():   # before merging: a flag of the section would replace `data: 5` silently
        if key in sections and dataclasses.is_dataclass(sections[key]) and not isinstance(value, dict):
            raise ConfigValueError((key,), f"must be a mapping of keys to values, got {cut_repr(value)}", path)
    overrides = merge(given, flags)
    # Merging over the full default dict keeps a task's section defaults (e.g. the LM's 2-layer decoder)
    # when only some keys of a section are given.
    try:
        return from_dict(run_cls, merge(to_dict(run_cls()), overrides), where=path), overrides
    except ConfigValueError as e:
        typed = len(e.path) == 2 and e.path[1] in flags.get(e.path[0], {})
        flag = getattr(args, "flag_names", {}).get(".".join(e.path)) if typed else None
        raise (e.as_flag(flag) if flag else e) from None


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
    """Read a YAML config file into a dict: one clear error line if it is not a mapping, is larger than
    MAX_CONFIG_BYTES, or expands (YAML aliases counted at each use) to more than MAX_CONFIG_VALUES values."""
    import yaml

    from seqgen.data.text import read_text
    loader = yaml.SafeLoader(read_text(path, limit=MAX_CONFIG_BYTES, what="a config file"))
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = str(getattr(e, "problem", None) or e).strip().splitlines()[0][:160]
        raise SeqgenError(f"{path}{line}: invalid YAML ({problem})") from None
    except RecursionError:
        raise SeqgenError(f"{path}: nested too deeply for a config file") from None
    except ValueError as e:     # e.g. an integer of more than 4,300 digits
        raise SeqgenError(f"{path}: a value cannot be read ({str(e).splitlines()[0][:120]})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SeqgenError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _check_expansion(root: Any, path: str) -> None:
    """Refuse a YAML document whose values, each alias counted at every use, exceed MAX_CONFIG_VALUES (an alias
    bomb: a few hundred bytes that expand to gigabytes), or that refers to itself."""
    sizes: dict[int, int] = {}
    started: set[int] = set()          # the nodes on the current path of the walk

    def children(node: Any) -> list:
        if isinstance(node.value, list):
            return [n for item in node.value for n in (item if isinstance(item, tuple) else (item,))]
        return []

    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            started.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[id(node)] > MAX_CONFIG_VALUES:
                raise SeqgenError(f"{path}: the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML "
                                  f"aliases counted at each use); a config file needs far fewer")
            continue
        if id(node) in sizes:
            continue
        started.add(id(node))
        stack.append((node, True))
        for child in children(node):
            if id(child) in started:
                raise SeqgenError(f"{path}: a YAML alias refers to the value that contains it; a config "
                                  f"cannot be recursive")
            if id(child) not in sizes:
                stack.append((child, False))
