"""``load_json(strict=True)``, what datasets are read with: no key twice in one object, no NaN or Infinity, no
number that overflows to infinity, each refused naming the entry and the field (job/core/parsing.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.core.parsing import ParseError, RefusedValue, load_json

REFUSED = [
    ('[{"a": 1}, {"output": "x", "output": "DUP"}]', "data: entry 1: key 'output' appears twice: keep one"),
    ('[{"output": "x", "output": "x"}]', "data: entry 0: key 'output' appears twice: keep one"),
    ('{"output": "x", "output": "y"}', "data: key 'output' appears twice: keep one"),
    ('[{"m": [{"role": "user", "role": "system"}]}]', "data: entry 0: field 'm.0': key 'role' appears twice: keep one"),
    ('[{"a": 1}, {"score": NaN}]', "data: entry 1: field 'score': NaN is not JSON"),
    ('[{"s": {"t": [1, Infinity]}}]', "data: entry 0: field 's.t.1': Infinity is not JSON"),
    ('[{"s": -Infinity}]', "data: entry 0: field 's': -Infinity is not JSON"),
    ('[{"s": 1e400}]', "data: entry 0: field 's': 1e400 overflows to infinity"),
    ('[{"s": -2.5E+999}]', "data: entry 0: field 's': -2.5E+999 overflows to infinity"),
    ("[1, 1e400]", "data: entry 1: 1e400 overflows to infinity"),
]


@pytest.mark.parametrize(("text", "start"), REFUSED)
def test_strict_json_refuses_a_key_twice_nan_and_infinity_naming_entry_and_field(text, start):
    with pytest.raises(RefusedValue) as info:
        load_json(text, "data", strict=True)
    assert str(info.value).startswith(start), info.value
    assert "\n" not in str(info.value)
    load_json(text, "data")  # not strict (our own files, replies): as json.loads reads it


@pytest.mark.parametrize(
    "text",
    [
        '[{"output": "x", "Output": "y"}]',  # keys differ by case: two keys
        '[{"a": {"k": 1}, "b": {"k": 2}}]',  # one key in two objects
        '[{"s": 1e308, "t": -1e-400, "u": 123456789012345678901234567890}]',  # finite, underflow to 0, a big int
        '[{"s": "NaN", "t": "Infinity"}]',  # strings
    ],
)
def test_strict_json_keeps_what_is_json(text):
    assert load_json(text, "data", strict=True) == json.loads(text)


def test_a_refused_value_after_a_long_int_or_deep_nesting_is_still_one_line():
    text = '[{"n": ' + "9" * 99 + '}, {"a": 1, "a": 2}]'
    with pytest.raises(RefusedValue, match=r"^data: entry 1: key 'a' appears twice"):
        load_json(text, "data", strict=True)
    with pytest.raises(ParseError, match="nested deeper"):
        load_json("[" * 70 + "]" * 70, "data", strict=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_any_json_reads_strictly_as_json_loads_reads_it(value):
    text = json.dumps(value)
    assert load_json(text, "data", strict=True) == json.loads(text)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=4), min_size=1, max_size=6),
       st.data())  # fmt: skip
def test_a_key_written_twice_in_any_entry_is_named_with_its_entry(entries, data):
    index = data.draw(st.integers(0, len(entries) - 1))
    key = data.draw(st.sampled_from(sorted(entries[index])))
    objects = [json.dumps(e) for e in entries]
    objects[index] = objects[index][:-1] + f", {json.dumps(key)}: 0}}"
    with pytest.raises(RefusedValue) as info:
        load_json("[" + ", ".join(objects) + "]", "data", strict=True)
    assert str(info.value).startswith(f"data: entry {index}: key ")
