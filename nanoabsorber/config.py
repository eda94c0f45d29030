"""One source of truth per setting: a dataclass field declares its default, its help and its
validation; the scripts build their flags from the dataclasses, never restating a default.

    @dataclass
    class MyConfig:
        steps: int = setting(90, "optimizer steps", check=non_negative)
        loss: str = setting("l1", "sync loss", choices=("l1", "mse"))
        def __post_init__(self):
            validate(self)                      # the same checks for the Python API

    p = Parser(description=...)
    add_flags(p, MyConfig)                      # --steps, --loss (help shows the default)
    args = p.parse_args()
    cfg = build(p, MyConfig, args)              # a bad value: one line, exit 2

Field names become flags (`sync_len` -> `--sync-len`, with an optional prefix such as
`lora-`); a field whose type is itself a config dataclass contributes that dataclass's flags.
A list-valued field (`adapter: list[str] = setting(default_factory=list, help=...)`) is a
repeatable flag (`--adapter a --adapter b`), its choices and check applied to each item.
Fields declared without help (plain `field`) are not flags. Bad values give one argparse-style
line ("absorb.py: error: argument --steps: must be >= 0, not -3") and exit status 2.
"""
import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

from .errors import ConfigError

Check = typing.Callable[[typing.Any], typing.Optional[str]]   # value -> problem, or None if fine


def setting(default=MISSING, help: str = "", *, check: Check | None = None, choices=None, default_factory=MISSING,
            prefix: str | None = None, metavar: str | None = None):
    """A dataclass field with its help and validation. check(value) returns a problem string or
    None; choices restricts the value; prefix (nested configs only) prefixes their flags."""
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices else None, "prefix": prefix,
            "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ----------------------------------------------------------------------------- checks

def positive(v) -> str | None:
    return None if v > 0 else f"must be > 0, not {v}"


def non_negative(v) -> str | None:
    return None if v >= 0 else f"must be >= 0, not {v}"


def in_range(lo: float, hi: float) -> Check:
    def check(v):
        return None if lo <= v <= hi else f"must be in [{lo:g}, {hi:g}], not {v}"
    return check


def comma_list(allowed: typing.Iterable[str], extra: typing.Iterable[str] = (), empty_ok: bool = True) -> Check:
    """A comma list of names from `allowed` (or one of `extra` alone, like 'all')."""
    allowed, extra = tuple(allowed), tuple(extra)

    def check(v: str):
        if v.strip() in extra:
            return None
        items = [x.strip() for x in v.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            return f"unknown {', '.join(map(repr, bad))}; use a comma list of {', '.join(allowed + extra)}"
        if not items and not empty_ok:
            return "must not be empty"
        return None
    return check


def folder_or_new(v: str) -> str | None:
    """A folder, or a path where one can be made (its first existing ancestor is a folder)."""
    from pathlib import Path

    if not str(v).strip():
        return "must not be empty"
    p = Path(v)
    if p.exists():
        return None if p.is_dir() else "exists and is not a folder"
    parent = next((a for a in p.parents if a.exists()), None)
    return None if parent is None or parent.is_dir() else f"cannot make a folder here ({parent} is a file)"


def _base_type(tp):
    """(type, optional) of an annotation: Optional[int] -> (int, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _list_item(tp):
    """The item type of a list-valued setting (list[str] -> str), else None."""
    if typing.get_origin(tp) in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _problem(f: dataclasses.Field, value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):          # a list-valued setting: choices and check per item
        return next((p for p in (_problem(f, v) for v in value) if p), None)
    choices, check = f.metadata.get("choices"), f.metadata.get("check")
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, not {value!r}"
    return check(value) if check else None


def validate(obj) -> None:
    """Run every field's choices/check on `obj`; ConfigError naming the first bad field."""
    for f in fields(obj):
        problem = _problem(f, getattr(obj, f.name))
        if problem:
            raise ConfigError(f.name, problem)


# ----------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + prefix + name.replace("_", "-")


def _converter(tp, f: dataclasses.Field):
    def convert(s: str):
        try:
            v = tp(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid {tp.__name__} value: {s!r}") from None
        problem = _problem(f, v)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return v
    convert.__name__ = tp.__name__
    return convert


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _settings(cls, prefix: str, skip: typing.Iterable[str]):
    """(field, type, prefix) of every flag-bearing setting of `cls`; a nested config dataclass
    comes as its own entry (type is the dataclass, prefix its flags' prefix)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        tp, _ = _base_type(hints[f.name])
        sub = f.metadata.get("prefix") if is_dataclass(tp) else None
        yield f, tp, prefix if sub is None else sub


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: typing.Iterable[str] = (),
              title: str | None = None) -> None:
    """Add a flag for every setting of dataclass `cls` (recursing into nested config dataclasses)."""
    group = parser.add_argument_group(title) if title else parser
    for f, tp, pre in _settings(cls, prefix, skip):
        if is_dataclass(tp):
            add_flags(parser, tp, pre, skip, title=f.metadata["help"])
            continue
        default, help, dest = _default(f), f.metadata["help"], (pre + f.name).replace("-", "_")
        if tp is bool:
            group.add_argument(flag_name(f.name, pre), dest=dest, action=argparse.BooleanOptionalAction,
                               default=default, help=help)
            continue
        item = _list_item(tp)
        if item is not None:                        # list-valued: a repeatable flag, one item each
            group.add_argument(flag_name(f.name, pre), dest=dest, type=_converter(item, f), action="append",
                               default=None, metavar=f.metadata.get("metavar"),
                               help=f"{help} (repeatable)".replace("%", "%%"))
            continue
        shown = "" if default is None else f" (default: {default!r})" if default == "" else f" (default: {default})"
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar") or ("{" + ",".join(map(str, choices)) + "}" if choices else None)
        group.add_argument(flag_name(f.name, pre), dest=dest, type=_converter(tp, f), default=default,
                           metavar=metavar, help=f"{help}{shown}".replace("%", "%%"))


def from_flags(cls, ns: argparse.Namespace, prefix: str = "", skip: typing.Iterable[str] = ()):
    """An instance of `cls` from parsed flags (skipped fields keep their defaults). A ConfigError
    from the dataclass's own validation is re-raised naming the flag."""
    kw = {}
    for f, tp, pre in _settings(cls, prefix, skip):
        v = from_flags(tp, ns, pre, skip) if is_dataclass(tp) else getattr(ns, (pre + f.name).replace("-", "_"))
        if v is None and _list_item(tp) is not None:   # a repeatable flag never given
            v = _default(f)
        kw[f.name] = v
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"argument {flag_name(e.name, prefix)}", e.problem) from None


def build(parser: argparse.ArgumentParser, cls, ns: argparse.Namespace, prefix: str = "",
          skip: typing.Iterable[str] = ()):
    """from_flags, with a bad combination reported through parser.error (one line, exit 2)."""
    try:
        return from_flags(cls, ns, prefix, skip)
    except ConfigError as e:
        parser.error(str(e))


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from dataclasses.asdict() output, validated.
    Unknown keys are a ConfigError (a config from another version)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting for {cls.__name__}")
    kw = {}
    for k, v in d.items():
        tp, _ = _base_type(hints[k])
        kw[k] = from_dict(tp, v) if is_dataclass(tp) and isinstance(v, dict) else v
    return cls(**kw)


def print_config(name: str, *parts) -> None:
    """One line on stderr: the script's resolved settings (dataclasses and/or Namespaces)."""
    import json

    out = {}
    for p in parts:
        out.update(dataclasses.asdict(p) if is_dataclass(p) else vars(p))
    print(f"{name} " + json.dumps(out, default=str), file=sys.stderr, flush=True)
