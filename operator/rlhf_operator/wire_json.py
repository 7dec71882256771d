"""JSON text that a YAML 1.1 reader reads as the same value: how the operator writes a stage's config.

Why JSON: rendering the config with libyaml's emitter was 12.7 % of the operator's GIL samples in a
burst of stage transitions (docs/benchmarks.md); this takes about a fifth of its time.
Why it must also be YAML: a stage image built before the entrypoint learnt to read JSON
(docs/stage-protocol.md) parses the file with PyYAML, and an operator upgrade must not break the
stages of images still in use. JSON is nearly a subset of YAML 1.1; the gaps, all closed here:

- numbers: YAML 1.1 reads a float only with a ``.`` and a signed exponent, so JSON's ``1e-05`` (a
  learning rate) would be the string "1e-05"; written ``1.0e-05`` it is a float in both.
- characters: a YAML reader refuses DEL and the C1 controls, and folds NEL, LINE SEPARATOR and
  PARAGRAPH SEPARATOR as line breaks even inside quotes; those are written as ``\\uXXXX`` escapes,
  which both read back as the character. Every other character is written as itself (an astral
  character escaped as JSON's surrogate pair would be read by PyYAML as two lone surrogates).
- keys: a YAML reader takes a flow mapping's key only within 1,024 characters of its start; a value
  with a longer key (a free-form map's, e.g. ``generation.extra``) is not written here at all.
- NaN and infinities have no JSON form: refused (the API server stores JSON, so a spec never holds them).
"""

from __future__ import annotations

import json
import re
from typing import Any

# A JSON string (skipped: its digits are text), or a number with an exponent and no fraction (float's
# repr always signs the exponent: 1e-05, 1e+16); the first pattern is a cheap look for one, since most
# configs have none.
_MAYBE_BARE_EXPONENT = re.compile(r"\d[eE][-+]\d")
_STRING_OR_BARE_EXPONENT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![\d.])(-?\d+)([eE][-+]\d+)')
# What a YAML 1.1 reader refuses, or takes for a line break, inside a double-quoted scalar.
_NOT_YAML_SAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def _number_with_a_point(match: re.Match[str]) -> str:
    if match.group(1) is None:
        return match.group(0)
    return f"{match.group(1)}.0{match.group(2)}"


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group(0)):04x}"


# Below the 1,024 characters a YAML reader allows a flow mapping's key, quotes and escapes included.
LONGEST_KEY = 1000


def _has_long_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(len(key) > LONGEST_KEY or _has_long_key(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_long_key(item) for item in value)
    return False


def dumps(value: Any) -> str | None:
    """``value`` (plain dicts, lists, str, int, float, bool, None) as one line of JSON, keys sorted,
    that ``json.loads`` and ``yaml.safe_load`` both read back as ``value``; None when YAML could not
    read it as JSON (a key longer than LONGEST_KEY): the caller then writes YAML."""
    if _has_long_key(value):
        return None
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
    if _MAYBE_BARE_EXPONENT.search(text):
        text = _STRING_OR_BARE_EXPONENT.sub(_number_with_a_point, text)
    return _NOT_YAML_SAFE.sub(_escape, text)
