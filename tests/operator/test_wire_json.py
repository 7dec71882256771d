"""wire_json: JSON that YAML 1.1 readers (PyYAML, pure and libyaml) read as the same value."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from rlhf_operator import wire_json

# Characters where JSON and YAML 1.1 part ways, or that a YAML reader refuses or folds.
AWKWARD = [
    "\u2028",
    "\u2029",
    "\x85",
    "\x7f",
    "\x9f",
    "\ufeff",
    "\t",
    "\n",
    "\r",
    "\x00",
    "\x1b",
    '"',
    "\\",
    "😀",
    "é",
    ": ",
    "# ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "&a",
    "*a",
    "!tag",
    "%",
    "@",
    "`",
    "1e-05",
    "~",
]


def _string(rng: random.Random) -> str:
    return "".join(
        rng.choice(AWKWARD) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x3000))
        for _ in range(rng.randrange(12))
    )


def _float(rng: random.Random) -> float:
    return rng.choice([rng.uniform(-1, 1) * 10 ** rng.randrange(-320, 308), 1e-05, 1e16, -2e20, 5e-324, 0.0, -0.0, 0.1])


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 6)
    if kind == 0:
        return _string(rng)
    if kind == 1:
        return _float(rng)
    if kind == 2:
        return rng.randrange(-(10**20), 10**20)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return rng.choice(["true", "null", "yes", "no", "on", "1e3", "0x10", "012", "1:20", ".inf", "", " "])
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_string(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


@pytest.mark.parametrize("seed", range(20))
def test_json_and_both_yaml_readers_read_back_the_value(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        value = {"spec": _value(rng), "lr": _float(rng)}
        text = wire_json.dumps(value)
        assert text is not None and "\n" not in text
        assert json.loads(text) == value
        assert yaml.load(text, Loader=yaml.SafeLoader) == value, text
        assert yaml.load(text, Loader=yaml.CSafeLoader) == value, text


def test_exponents_get_a_point_only_outside_strings() -> None:
    text = wire_json.dumps({"lr": 1e-05, "big": 1e16, "fine": 1.5e-07, "note": "lr 1e-05, 2e+20"})
    assert text == '{"big": 1.0e+16, "fine": 1.5e-07, "lr": 1.0e-05, "note": "lr 1e-05, 2e+20"}'


def test_a_key_too_long_for_yaml_is_not_written_and_nan_is_refused() -> None:
    assert wire_json.dumps({"a": [{"k" * (wire_json.LONGEST_KEY + 1): 1}]}) is None
    assert wire_json.dumps({"k" * wire_json.LONGEST_KEY: 1}) is not None
    with pytest.raises(ValueError):
        wire_json.dumps({"x": float("nan")})
