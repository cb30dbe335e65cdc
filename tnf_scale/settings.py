"""Settings declared once. A settings class is a dataclass whose fields carry their help text and rules in their
metadata (`setting`); a field's type gives its flag's parser and its choices (`Literal`). The flags and `--help`, the
config files, the resume and comparison checks and the table in docs/configuration.md all read the declaration, so
adding a setting is adding one field.

A run's settings come in sections (data, model, ...): a section is one such dataclass, and a command's settings class
inherits the sections it takes, so their fields stay one flat namespace of flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tnf_scale.errors import ConfigError

# A setting's resume rule: what a checkpoint's tensors and data order depend on must match when a run resumes.
MUST_MATCH = "must match"
MAY_CHANGE = "may change"

# A setting's role when two runs are compared at equal steps (time to loss, sweeps, the fault campaign).
COMPUTES = "computes"  # what the run computes: the compared runs must agree
NOTES = "notes"  # what the notes do: a baseline has none
STARTS = "starts"  # where and how a run is started, not what it trains
PACES = "paces"  # how a run is logged, checkpointed and laid out over ranks, not what it computes
COMPARED = "compared"  # what a comparison is of (notes or not, which network reads them) and over how many steps

# What a run started with --init_from takes from the model or run it starts from.
SHAPE = "shape"  # the network's shape: the model's own; another value is refused
CARRIED = "carried"  # phase 1's value unless given: the data a phase-2 run's tokenizer and rare words come from


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Any = dataclasses.MISSING,
    resume: str = MUST_MATCH,
    role: str = COMPUTES,
    flag: str | None = None,
    init: str | None = None,
    auto: bool = False,
) -> Any:
    """A dataclass field with its help text (one sentence or more, no default: --help adds it), its resume rule
    (MUST_MATCH unless said otherwise, so a new field that shapes the model is checked) and its comparison role.
    `flag` names the value in --help (e.g. PATH) where the type alone says too little; `init` says what a run
    started with --init_from takes from there (SHAPE or CARRIED; None: nothing). A yes/no setting with `auto` also
    takes AUTO on the command line, which the command decides (config.parse_args)."""
    metadata = {"help": help, "resume": resume, "role": role, "metavar": flag, "init": init, "auto": auto}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """Every field of a settings class by name, in declaration order (the sections' first)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def home_section(cls: type) -> dict[str, str | None]:
    """field name -> the SECTION of the class that declares it (None: a top-level setting such as the preset)."""
    homes = {}
    for owner in reversed(cls.__mro__):
        for name in vars(owner).get("__annotations__", {}):
            homes[name] = vars(owner).get("SECTION")
    return {name: homes[name] for name in fields_of(cls)}


def sections_of(cls: type) -> dict[str | None, type]:
    """SECTION -> the class that declares that section's fields, in declaration order."""
    owners = {}
    for owner in reversed(cls.__mro__):
        if dataclasses.is_dataclass(owner) and vars(owner).get("__annotations__"):
            owners.setdefault(vars(owner).get("SECTION"), owner)
    return owners


def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved type (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def names_where(cls: type, key: str, value: str) -> tuple[str, ...]:
    """The fields whose metadata `key` (resume, role) is `value`, in declaration order."""
    return tuple(name for name, f in fields_of(cls).items() if f.metadata.get(key, MUST_MATCH) == value)


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def choices_of(kind: Any) -> tuple | None:
    """The values a `Literal` type allows, or None."""
    base, _ = _unwrap(kind)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


BOOLEAN_WORDS = {
    "true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip


AUTO = "auto"


def parse_bool(text: str, auto: bool = False) -> bool | str:
    """true/false, yes/no, on/off, 1/0 (any case); with `auto`, AUTO too."""
    word = text.lower()
    if auto and word == AUTO:
        return AUTO
    try:
        return BOOLEAN_WORDS[word]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a yes/no value{' or auto' if auto else ''}; write "
            f"{'true, false or auto' if auto else 'true or false'} (or yes/no, on/off, 1/0)"
        ) from None


def value_fits(kind: Any, value: Any) -> bool:
    """Whether a value read from a config file has a field's type."""
    base, nullable = _unwrap(kind)
    if value is None:
        return nullable
    if typing.get_origin(base) is Literal:
        return value in typing.get_args(base)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return isinstance(value, list) and all(value_fits(item, v) for v in value)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


def type_words(kind: Any) -> str:
    """A field's type as a config file's author reads it."""
    base, nullable = _unwrap(kind)
    choices = choices_of(base)
    if choices:
        words = " or ".join(repr(c) for c in choices)
    elif typing.get_origin(base) is list:
        words = "a list of " + {str: "strings", int: "whole numbers", float: "numbers"}[typing.get_args(base)[0]]
    else:
        words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[base]
    return f"{words}, or null" if nullable else words


def required(f: dataclasses.Field) -> bool:
    """Whether a field has no default: its flag must be given."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default_words(f: dataclasses.Field) -> str:
    """A field's class default as --help and the docs show it."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(str(_relative(v)) for v in value)
    return str(_relative(value))


def _relative(value: Any) -> Any:
    """Paths inside the checkout are shown relative to it."""
    from tnf_scale.config import REPO

    if isinstance(value, str) and value.startswith(str(REPO) + "/"):
        return value.removeprefix(str(REPO) + "/")
    return value


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults_from: str = "", skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (but `skip`), grouped by section, each defaulting to None (not given); --help shows
    the help, the choices and the class default (`defaults_from` says whose, e.g. " (tiny)")."""
    hints, homes, owners = field_types(cls), home_section(cls), sections_of(cls)
    groups: dict[str | None, Any] = {}
    for name, f in fields_of(cls).items():
        if name in skip:
            continue
        section = homes[name]
        if section not in groups:
            doc = (owners[section].__doc__ or "").strip().splitlines()
            groups[section] = parser.add_argument_group(section, doc[0] if doc else None)
        base, _ = _unwrap(hints[name])
        choices = choices_of(base)
        shown = "required" if required(f) else f"default{defaults_from}: {_default_words(f)}"
        help_text = f"{f.metadata['help']} ({shown})".replace("%", "%%")
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        metavar = f.metadata.get("metavar") or {int: "N", float: "X", str: "TEXT"}.get(item)
        options: dict[str, Any] = {"default": None, "help": help_text, "metavar": metavar, "required": required(f)}
        if choices:  # checked by the settings' validation, whose refusal is one sentence
            options.update(metavar="{" + ",".join(choices) + "}")
        elif base is bool and f.metadata.get("auto"):
            options.update(
                type=functools.partial(parse_bool, auto=True), nargs="?", const=True, metavar="true|false|auto"
            )
        elif base is bool:
            options.update(type=parse_bool, nargs="?", const=True, metavar="true|false")
        elif typing.get_origin(base) is list:
            options.update(nargs="+", type=typing.get_args(base)[0])
        else:
            options.update(type=base)
        groups[section].add_argument(f"--{name}", **options)


def from_flags(cls: type, args: argparse.Namespace) -> Any:
    """A settings object of the flags given (add_flags leaves the others None), the class defaults for the rest."""
    return cls(**{name: getattr(args, name) for name in fields_of(cls) if getattr(args, name) is not None})


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """A TOML, YAML or JSON file of settings, flat or nested by section (`[model]` / `model:`): field -> value,
    each checked against its field's type and section."""
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist; pass a TOML, YAML or JSON file of settings.")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix, "JSON")
        detail = str(err).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid {kind} ({detail}); fix the file.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold a table of settings (key = value), not a {type(raw).__name__}.")
    fields, hints, home = fields_of(cls), field_types(cls), home_section(cls)
    sections = set(sections_of(cls)) - {None}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            for name, inner in value.items():
                if name in fields and home.get(name) != key:
                    raise ConfigError(
                        f"--config {path} puts {name} under [{key}]; it belongs under [{home[name]}]: move it there."
                    )
                values[name] = inner
        else:
            values[key] = value
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else "the settings are the flags --help lists, in sections."
            raise ConfigError(f"--config {path} has no setting named {name!r}; {hint}")
        if not value_fits(hints[name], value):
            raise ConfigError(
                f"--config {path} gives {name} = {value!r}, but {name} takes {type_words(hints[name])}; fix the "
                "value in the file."
            )
    return values


def by_section(settings: Any) -> dict[str, Any]:
    """A settings object as nested tables, one per section (a config file's layout)."""
    result: dict[str, Any] = {}
    for name, section in home_section(type(settings)).items():
        (result.setdefault(section, {}) if section else result)[name] = getattr(settings, name)
    return result


def markdown_table(cls: type, defaults_from: str = "") -> str:
    """The reference table of every setting of `cls`: section, flag, default, choices or type, resume rule, help."""
    hints, home = field_types(cls), home_section(cls)
    rows = [
        f"| flag | default{defaults_from} | takes | on resume | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    current = None
    for name, f in fields_of(cls).items():
        if home[name] != current:
            current = home[name]
            rows.append(f"| **{current}** | | | | |")
        default = _default_words(f) or "(empty)"
        help_text = f.metadata["help"].replace("|", "\\|")
        words = "true, false or auto" if f.metadata.get("auto") else type_words(hints[name])
        rows.append(f"| `--{name}` | `{default}` | {words} | {f.metadata['resume']} | {help_text} |")
    return "\n".join(rows) + "\n"
