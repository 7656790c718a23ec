"""options.py: one field declares an option (help, env default, choices, rule), mitmproxy gets it
as datalab_<field>, and an instance's values are refused by the field's own rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import options
from backends import choice
from config import Config
from options import option


@dataclass(frozen=True)
class Example:
    count: int = option(2, "How many.", check=options.positive)
    spare: int = option(0, "Spare ones.", check=options.non_negative)
    colour: str = option("red", "Which colour.", "EXAMPLE_COLOUR", choices=("red", "green"))
    size: str = option("1g", "How big.", check=r"[0-9]+[kmg]")
    where: str = option("/tmp", "Where.", check=options.absolute_path)
    derived: int = 0  # not an option


class Declaring:
    """An addon that declares Example's options, as Config declares Settings'."""

    def load(self, loader) -> None:
        options.add_options(loader.add_option, options.option_fields(Example))


def test_only_option_fields_are_options():
    assert [f.name for f in options.option_fields(Example)] == ["count", "spare", "colour", "size", "where"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"count": 0}, "datalab_count must be positive"),
        ({"count": -1}, "datalab_count must be positive"),
        ({"spare": -1}, "datalab_spare must be zero or positive"),
        ({"colour": "blue"}, "datalab_colour must be one of red, green"),
        ({"size": "big"}, "datalab_size must match"),
        ({"where": "relative/path"}, "datalab_where must be an absolute path"),
    ],
)
def test_a_value_against_its_rule_is_refused_with_its_name(changes, message):
    with pytest.raises(ValueError, match=message):
        options.check_options(Example(**changes))


def test_good_values_pass():
    options.check_options(Example(count=1, spare=0, colour="green", size="512m", where="/srv"))


def test_mitmproxy_gets_name_type_default_help_and_choices(monkeypatch):
    monkeypatch.delenv("EXAMPLE_COLOUR", raising=False)
    with taddons.context(Declaring()) as tctx:
        colour = tctx.options._options["datalab_colour"]
        assert (colour.typespec, colour.default, colour.help) == (str, "red", "Which colour.")
        assert colour.choices == ("red", "green")
        assert tctx.options._options["datalab_count"].typespec is int
        assert tctx.options._options["datalab_count"].choices is None
        assert "datalab_derived" not in tctx.options


def test_the_default_comes_from_its_environment_variable(monkeypatch):
    monkeypatch.setenv("EXAMPLE_COLOUR", "green")
    with taddons.context(Declaring()) as tctx:
        assert tctx.options.datalab_colour == "green"


@pytest.mark.parametrize("raw, value", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_a_boolean_default_from_the_environment(monkeypatch, raw, value):
    @dataclass(frozen=True)
    class Flag:
        on: bool = option(False, "On or off.", "EXAMPLE_FLAG")

    monkeypatch.setenv("EXAMPLE_FLAG", raw)
    assert options.typed_default(options.option_fields(Flag)[0]) is value


@pytest.mark.parametrize(
    "name, value",
    [
        ("datalab_backend", "kubernetes"),
        ("datalab_cookie_samesite", "Never"),
        ("datalab_sign_scheme", "md5"),
        ("datalab_routing", "path"),
    ],
)
def test_fixed_value_options_show_their_choices_and_refuse_others(name, value):
    addon = Config(lambda s: None)
    with taddons.context(addon) as tctx:
        assert value not in tctx.options._options[name].choices
        tctx.configure(addon, datalab_sign_key="k")
        with pytest.raises(exceptions.OptionsError, match=f"{name} must be one of"):
            tctx.configure(addon, **{name: value})


def test_the_backend_help_names_every_backend():
    with taddons.context(Config(lambda s: None)) as tctx:
        backend = tctx.options._options["datalab_backend"]
        assert backend.choices == choice.CHOICES
        for name in choice.CHOICES:
            assert name in backend.help
