"""The settings' base: a field's docstring is its help, values are of the field's own type (no coercion), and a
composition of settings classes runs every part's checks with none called by hand."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, check_value, field_help, marks, operational_options, option, positive
from job.models.decoding_config import DecodingSettings
from job.stages.judge_config import JudgeSettings


class Beams(Settings):
    help_section: ClassVar[str] = "Generate"
    beam_width: int = option(1, operational=True)
    """Beams kept
    while decoding."""
    length_penalty: float = 1.0
    """Exponent of the length."""
    beam_seed: str | None = None
    """A seed, as text."""

    @model_validator(mode="after")
    def _check_beams(self):
        positive(self, "beam_width")
        return self


def test_a_fields_docstring_is_its_help_on_one_line_and_its_marks_are_where_it_is():
    assert field_help(Beams, "beam_width") == "Beams kept while decoding."
    assert marks(Beams, "beam_width")["operational"] and operational_options(Beams) == {"beam_width"}
    assert marks(Beams, "length_penalty") == {}


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"beam_width": 1.5}, "beam_width must be an integer, got 1.5"),
        ({"beam_width": True}, "beam_width must be an integer, got True"),
        ({"beam_width": "2"}, "beam_width must be an integer, got '2'"),
        ({"length_penalty": "1"}, "length_penalty must be a number, got '1'"),
        ({"length_penalty": math.nan}, "length_penalty must be a finite number, got nan"),
        ({"length_penalty": -math.inf}, "length_penalty must be a finite number, got -inf"),
        ({"beam_seed": 5}, "beam_seed must be a string, got 5"),
        ({"beam_width": 0}, "beam_width must be positive, got 0"),
        ({"beam_widht": 2}, "beam_widht is not an option here"),
    ],
)
def test_a_value_of_another_type_or_a_failed_check_is_one_config_error_naming_the_field(values, line):
    with pytest.raises(ConfigError) as refused:
        Beams(**values)
    assert str(refused.value).startswith(line) and "\n" not in str(refused.value)


def test_an_integer_is_a_number_and_keeps_its_value():
    assert Beams(length_penalty=2).length_penalty == 2.0


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
def test_no_fraction_becomes_an_integer(value):
    with pytest.raises(ConfigError, match="^beam_width must be an integer"):
        Beams(beam_width=value)
    with pytest.raises(ConfigError, match="^beam_width must be an integer"):
        check_value(Beams, "beam_width", value)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False)))
def test_a_yaml_number_for_a_string_field_is_its_text(value):
    """YAML reads `judge_wait: 300` and `run_id: 42` as numbers: a string field takes their text."""
    assert check_value(Beams, "beam_seed", value) == str(value)
    assert check_value(Beams, "beam_seed", None) is None
    with pytest.raises(ConfigError, match="^beam_seed must be a string, got True"):
        check_value(Beams, "beam_seed", True)


def test_a_composition_runs_every_parts_checks_and_none_is_called_by_hand():
    class Composed(Beams, DecodingSettings, JudgeSettings):
        """Three owners' settings, nothing of its own."""

    assert set(Composed.model_fields) == set(Beams.model_fields) | set(DecodingSettings.model_fields) | set(
        JudgeSettings.model_fields
    )
    for values, line in (
        ({"beam_width": 0}, "beam_width must be positive"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"judge_retries": -1}, "judge_retries must be >= 0"),
        ({"judge_wait": "soon"}, "judge_wait 'soon' must look like"),
    ):
        with pytest.raises(ConfigError, match=f"^{line}"):
            Composed(**values)
    assert Composed(beam_width=3, top_k=5, judge_model="qwen3").judge_wait_seconds == 300.0
