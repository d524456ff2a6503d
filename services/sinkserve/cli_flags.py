"""CLI flags derived from the typed config (`sinkserve.config`): one flag per config field, nothing copied.

A command names the config fields it exposes; each becomes an option whose help is the field's description and
whose shown default is the field's default, so the CLI cannot drift from the config. A flag the user did not
give arrives as None and leaves the field to the config (its default, then `SINKSERVE_*` env); a flag the user
gave, 0 and the empty string included, is passed on and validated by the pydantic model, and a validation error
names the flag (`--window: Input should be greater than or equal to 1`), not the config path.

No torch or Ray here: `sinkserve chat` and `sinkserve tenant` import it.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, TypeVar, Union

import typer
from pydantic import BaseModel, ValidationError

from sinkserve.config import Settings

T = TypeVar("T")


class ConfigError(ValueError):
    """Config values that do not validate, described by the flags (or config paths) they came from."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Flag:
    """One config field as a command-line option."""

    section: str  # the Settings section the field belongs to ("engine")
    field: str  # the field's name in that section's model
    decls: tuple[str, ...]  # option names, the long one first: ("--replicas", "-n")

    @property
    def param(self) -> str:
        """The callback parameter behind the option (never clashes with a command's own parameters)."""
        return f"cfg__{self.section}__{self.field}"

    @property
    def name(self) -> str:
        return self.decls[0]


def _option_type(annotation: Any) -> Any:
    """The option's annotation for a config field's: Optional of it, so that None can mean "not given"."""
    field_type = annotation
    if typing.get_origin(field_type) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(field_type) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no CLI flag for a field of type {annotation!r}")
        field_type = inner[0]
    literal = typing.get_origin(field_type) is Literal and all(isinstance(a, str) for a in typing.get_args(field_type))
    if literal or field_type in (int, float, str):
        return Optional[field_type]  # a Literal becomes a choice of its values
    raise TypeError(f"no CLI flag for a field of type {annotation!r}")


class ConfigFlags:
    """Options for some fields of some config sections; combine sets with `+`, decorate a command with it.

    The decorated command gets one keyword argument more, `flags` (a `GivenFlags`), instead of one argument per
    option.
    """

    def __init__(self, entries: Iterable[tuple[type[BaseModel], Flag]] = ()):
        self.entries: list[tuple[type[BaseModel], Flag]] = list(entries)
        names = [decl for _, flag in self.entries for decl in flag.decls]
        if len(names) != len(set(names)):
            raise ValueError(f"an option name is used twice: {names}")

    @classmethod
    def of(cls, section: str, fields: Iterable[str | tuple[str, ...]] | None = None) -> "ConfigFlags":
        """Flags for `fields` of the Settings section `section` (all its fields when None). A field is a name
        (`"window"` -> `--window`) or the name followed by its option names (`("num_replicas", "--replicas", "-n")`)."""
        model = Settings.model_fields[section].annotation
        entries = []
        for spec in model.model_fields if fields is None else fields:
            name, *decls = (spec,) if isinstance(spec, str) else spec
            if name not in model.model_fields:
                raise KeyError(f"{model.__name__} has no field {name!r}")
            flag = Flag(section, name, tuple(decls) or ("--" + name.replace("_", "-"),))
            _option_type(model.model_fields[name].annotation)  # refuses a type no flag can carry, at import
            entries.append((model, flag))
        return cls(entries)

    def __add__(self, other: "ConfigFlags") -> "ConfigFlags":
        return ConfigFlags(self.entries + other.entries)

    def flag(self, loc: tuple[Any, ...]) -> Flag | None:
        """The flag of a config location such as ("engine", "window"), if this set has one."""
        for _, flag in self.entries:
            if tuple(loc[:2]) == (flag.section, flag.field):
                return flag
        return None

    def option(self, model: type[BaseModel], flag: Flag) -> tuple[Any, Any]:
        info = model.model_fields[flag.field]
        default = info.get_default(call_default_factory=True)
        return _option_type(info.annotation), typer.Option(
            None,
            *flag.decls,
            help=info.description,
            # The config's default, shown as it is; the option's own default stays None (= not given).
            show_default=False if default is None else str(default),
        )

    def __call__(self, command: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(command, eval_str=True)
        hints = typing.get_type_hints(command)
        if "flags" not in signature.parameters:
            raise TypeError(f"{command.__name__} must take a `flags` keyword argument")
        params = [p for p in signature.parameters.values() if p.name != "flags"]
        annotations = {p.name: hints[p.name] for p in params if p.name in hints}
        for model, flag in self.entries:
            annotation, option = self.option(model, flag)
            params.append(inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
            annotations[flag.param] = annotation

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> T:
            values: dict[str, dict[str, Any]] = {}
            for _, flag in self.entries:
                value = kwargs.pop(flag.param)
                if value is not None:
                    values.setdefault(flag.section, {})[flag.field] = value
            return command(**kwargs, flags=GivenFlags(self, values))

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        return wrapper


class GivenFlags:
    """The config flags a user gave on one command line, by section: {"engine": {"window": 0}}."""

    def __init__(self, flags: ConfigFlags, values: dict[str, dict[str, Any]]):
        self.flags = flags
        self.values = values

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values.get(name, {}))

    def describe(self, err: ValidationError) -> list[str]:
        """One line per problem of a Settings validation, led by the flag that set the value (or by the config
        path when no flag did: a default or a SINKSERVE_* variable)."""
        problems = []
        for error in err.errors():
            loc = tuple(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            flag = self.flags.flag(loc)
            if flag is not None and flag.field in self.values.get(flag.section, {}):
                problems.append(f"{flag.name}: {message}")
            elif loc:
                problems.append(f"{'.'.join(map(str, loc))}: {message}")
            else:
                problems.append(message)
        return problems

    def build(self, make: Callable[[], T]) -> T:
        """Run `make` (a Settings constructor); a ValidationError becomes a `ConfigError` that names the flags."""
        try:
            return make()
        except ValidationError as err:
            raise ConfigError(self.describe(err)) from None
