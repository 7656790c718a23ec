"""One way to declare a datalab_* option: a dataclass field made with `option()`.

The field carries its help, the environment variable of its default, its fixed choices and its
rule; `add_options` declares such fields to mitmproxy (`datalab_<field>`, choices shown in
--options and mitmweb) and `check_options` refuses an instance's values by those rules, so an
option is written down once: Settings (config.py) and each backend's Options alike. Imports
nothing of ours.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

PREFIX = "datalab_"

# A rule: what is wrong with a value ("must be positive"), or None when it is right.
Rule = Callable[[Any], str | None]


def option(
    default: Any,
    help: str,
    env: str | None = None,
    *,
    choices: Sequence[str] | None = None,
    check: Rule | str | None = None,
) -> Any:
    """A dataclass field that is the option datalab_<field>: its help, the environment variable its
    default is read from, its fixed values (`choices`) and its rule (`check`: a Rule, or a regular
    expression the whole value must match)."""
    if isinstance(check, str):
        check = matches(check, f"must match {check}")
    metadata = {"help": help, "env": env, "choices": tuple(choices) if choices else None, "check": check}
    return dataclasses.field(default=default, metadata=metadata)


def option_name(field: str) -> str:
    return PREFIX + field


def option_error(name: str, message: str) -> ValueError:
    """How an option's value is refused: the option's name, then why."""
    return ValueError(f"{option_name(name)} {message}")


# Rules


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be zero or positive"


def absolute_path(value: str) -> str | None:
    return None if os.path.isabs(value) else "must be an absolute path"


def matches(pattern: str, problem: str) -> Rule:
    """The whole value must match `pattern`; else `problem`."""
    compiled = re.compile(pattern)
    return lambda value: None if compiled.fullmatch(value) else problem


def holds(test: Callable[[Any], bool], problem: str) -> Rule:
    """`test(value)` must be true; else `problem`."""
    return lambda value: None if test(value) else problem


# Declaring and checking


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass's fields made with option() (others, such as derived values, are not options)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def typed_default(field: dataclasses.Field) -> Any:
    """The option's default: its environment variable when set (as the field's type), else the field's."""
    raw = os.environ.get(field.metadata["env"]) if field.metadata["env"] else None
    if raw is None or raw == "":
        return field.default
    if isinstance(field.default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(field.default)(raw)


def add_options(add_option: Callable[..., None], fields: list[dataclasses.Field]) -> None:
    """Declare the fields to mitmproxy (`loader.add_option`)."""
    for f in fields:
        add_option(option_name(f.name), type(f.default), typed_default(f), f.metadata["help"], f.metadata["choices"])


def problem_of(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with the field's value by its choices and rule, or None."""
    choices = field.metadata["choices"]
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}"
    check = field.metadata["check"]
    return check(value) if check else None


def check_options(instance: Any) -> None:
    """Refuse the dataclass instance's first option value that breaks its choices or rule (ValueError
    `datalab_<name> must be ...`)."""
    for f in option_fields(type(instance)):
        if (problem := problem_of(f, getattr(instance, f.name))) is not None:
            raise option_error(f.name, problem)
