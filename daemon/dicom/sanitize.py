"""A clean copy of what the outputs take from a source image's header.

Real modalities write slips: a birth date ``1970-01-31``, a time with colons,
a sex of ``MALE``, a patient name with two values, a character set nobody
knows. Copied as they are into an SR, each one makes the SR builder raise or
the SR invalid, and the study never gets a report. So every output is built
from :func:`sanitized`: a copy holding only top-level, standard, non-sequence
attributes, each either valid for its VR and VM, repaired where the repair is
certain, or dropped. Each repair or drop is a :class:`Repair` that names the
attribute keyword and the kind of problem, never the value (the values are
patient data).

Warnings that pydicom raises while values are decoded quote the values; they
are caught here and reduced to their category.
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, time

from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName, validate_value

UTF8 = "ISO_IR 192"
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ", "OB or OW", "US or OW",
             "US or SS or OW"}
"""Not copied: pixel data, other bulk data and sequences."""
_NUMERIC_VRS = {"AT", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV", "US or SS"}
"""Binary numbers cannot hold a malformed string: copied as they are (VM checked)."""
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
}
_SEX_WORDS = {"MALE": "M", "FEMALE": "F", "OTHER": "O", "MAN": "M", "WOMAN": "F"}
_CONTROL_SHORT = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
"""SH, LO, PN: no control characters but ESC (PS3.5 6.2)."""
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
"""ST, LT, UT: TAB, LF, FF, CR and ESC are allowed."""
_DATE_SEPARATED = re.compile(r"^(\d{4})[-/.](\d{2})[-/.](\d{2})$")
_TIME_COLONS = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")
_DT_SEPARATED = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?)?([+-]\d{4})?$")


class Problem(enum.StrEnum):
    """What was wrong with a value (never the value itself)."""

    INVALID_FOR_VR = "invalid for its VR"
    NOT_A_REAL_DATE = "not a real date or time"
    TOO_MANY_VALUES = "more values than its VM allows"
    NOT_AN_ENUMERATED_VALUE = "not one of its enumerated values"
    UNDECODABLE = "cannot be decoded with its character set"
    UNKNOWN_CHARACTER_SET = "unknown Specific Character Set"
    SEPARATORS = "date or time written with separators"
    CASE = "lower-case letters in a code string"
    WORD_FOR_CODE = "a word instead of its code"
    CONTROL_CHARACTERS = "control characters"
    TOO_LONG = "longer than its VR allows"


class Action(enum.StrEnum):
    REPAIRED = "repaired"
    DROPPED = "dropped"


@dataclass(frozen=True)
class Repair:
    keyword: str
    action: Action
    problem: Problem

    def as_detail(self) -> dict[str, str]:
        return {"attribute": self.keyword, "action": self.action.value,
                "problem": self.problem.value}


@dataclass(frozen=True)
class Sanitized:
    dataset: Dataset
    """The clean copy: only standard, top-level, non-sequence attributes, all valid."""
    repairs: tuple[Repair, ...]


def _real_date(text: str) -> bool:
    try:
        date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _real_time(text: str) -> bool:
    digits = text.split(".")[0]
    try:
        time(int(digits[0:2]), int(digits[2:4] or 0), min(int(digits[4:6] or 0), 59))
    except ValueError:
        return False
    return True


def _repair_da(value: str) -> tuple[str, Problem | None]:
    m = _DATE_SEPARATED.match(value.strip())
    if m:
        return "".join(m.groups()), Problem.SEPARATORS
    return value, None


def _repair_tm(value: str) -> tuple[str, Problem | None]:
    m = _TIME_COLONS.match(value.strip())
    if m:
        return "".join(g or "" for g in m.groups()), Problem.SEPARATORS
    return value, None


def _repair_dt(value: str) -> tuple[str, Problem | None]:
    m = _DT_SEPARATED.match(value.strip())
    if m:
        return "".join(g or "" for g in m.groups()), Problem.SEPARATORS
    return value, None


def _repair_cs(keyword: str, value: str) -> tuple[str, Problem | None]:
    stripped = value.strip()
    if keyword == "PatientSex" and stripped.upper() in _SEX_WORDS:
        return _SEX_WORDS[stripped.upper()], Problem.WORD_FOR_CODE
    if stripped != stripped.upper():
        return stripped.upper(), Problem.CASE
    return value, None


_REPAIRS: dict[str, Callable[[str], tuple[str, Problem | None]]] = {
    "DA": _repair_da, "TM": _repair_tm, "DT": _repair_dt,
}
_MAX_LENGTH = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UT": 2**32 - 2, "CS": 16,
               "AE": 16}


def _semantic_problem(vr: str, text: str) -> Problem | None:
    if vr == "DA" and text and not _real_date(text):
        return Problem.NOT_A_REAL_DATE
    if vr == "TM" and text and not _real_time(text):
        return Problem.NOT_A_REAL_DATE
    if vr == "DT" and len(text) >= 8 and not _real_date(text[:8]):
        return Problem.NOT_A_REAL_DATE
    return None


def _clean_value(keyword: str, vr: str, value: str) -> tuple[str | None, list[Problem], Problem | None]:
    """One value: (clean value or None, repairs made, why it was dropped)."""
    repairs: list[Problem] = []
    control = _CONTROL_SHORT if vr in ("SH", "LO", "PN") else _CONTROL_TEXT
    if vr in ("SH", "LO", "ST", "LT", "UT", "PN") and control.search(value):
        value = control.sub("", value.replace("\t", " "))
        repairs.append(Problem.CONTROL_CHARACTERS)
    if vr in _REPAIRS:
        value, fixed = _REPAIRS[vr](value)
        if fixed is not None:
            repairs.append(fixed)
    if vr == "CS":
        value, fixed = _repair_cs(keyword, value)
        if fixed is not None:
            repairs.append(fixed)
    if vr in ("SH", "LO") and len(value) > _MAX_LENGTH[vr]:
        value = value[:_MAX_LENGTH[vr]].rstrip()
        repairs.append(Problem.TOO_LONG)
    if vr in ("IS", "DS"):
        value = value.strip()
    try:
        validate_value(vr, value, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return None, repairs, Problem.INVALID_FOR_VR
    semantic = _semantic_problem(vr, value)
    if semantic is not None:
        return None, repairs, semantic
    allowed = _ENUMERATED.get(keyword)
    if allowed is not None and value and value not in allowed:
        return None, repairs, Problem.NOT_AN_ENUMERATED_VALUE
    return value, repairs, None


def _vm_max(tag: int) -> int | None:
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return None
    if vm.isdigit():
        return int(vm)
    return None


def _text_values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return ["" if v is None else str(v) for v in items]


def _charset_known(charset: object) -> bool:
    terms = list(charset) if isinstance(charset, (MultiValue, list, tuple)) else [charset]
    return all(not t or str(t).strip() in python_encoding for t in terms)


def sanitized(header: Dataset, keep: Callable[[str], bool] | None = None) -> Sanitized:
    """The clean copy of ``header`` (see the module docstring) and what was repaired or dropped.

    ``keep`` chooses attributes by keyword (default: every standard one). Never raises
    for bad values; the copy's text is Unicode, written as ISO_IR 192 when not ASCII.
    """
    out = Dataset()
    repairs: list[Repair] = []
    charset = header.get("SpecificCharacterSet")
    if charset is not None and not _charset_known(charset):
        repairs.append(Repair("SpecificCharacterSet", Action.REPAIRED,
                              Problem.UNKNOWN_CHARACTER_SET))
    non_ascii = False
    with warnings.catch_warnings():
        # pydicom's decoding warnings quote the values: silence them here; the repair
        # list says what happened.
        warnings.simplefilter("ignore")
        for tag in list(header.keys()):
            keyword = keyword_for_tag(tag)
            if not keyword or tag.is_private or keyword == "SpecificCharacterSet":
                continue
            if keep is not None and not keep(keyword):
                continue
            try:
                elem = header[tag]
            except Exception:  # noqa: BLE001 - the attribute's boundary: recorded as dropped, the copy goes on
                repairs.append(Repair(keyword, Action.DROPPED, Problem.UNDECODABLE))
                continue
            vr = elem.VR
            if vr in _BULK_VRS or vr is None:
                continue
            if vr in _NUMERIC_VRS:
                count = len(elem.value) if isinstance(elem.value, (MultiValue, list)) else 1
                vm_limit = _vm_max(tag)
                if vm_limit is not None and count > vm_limit:
                    repairs.append(Repair(keyword, Action.DROPPED, Problem.TOO_MANY_VALUES))
                else:
                    out.add(elem)
                continue
            try:
                values = _text_values(elem)
            except Exception:  # noqa: BLE001 - the attribute's boundary: an unconvertible raw value is recorded as dropped
                repairs.append(Repair(keyword, Action.DROPPED, Problem.INVALID_FOR_VR))
                continue
            vm_max = _vm_max(tag)
            if vm_max is not None and len(values) > vm_max:
                repairs.append(Repair(keyword, Action.DROPPED, Problem.TOO_MANY_VALUES))
                setattr(out, keyword, "")
                continue
            clean: list[str] = []
            dropped: Problem | None = None
            fixes: list[Problem] = []
            for raw in values:
                value, fixed, dropped = _clean_value(keyword, vr, raw)
                fixes += fixed
                if value is None:
                    break
                clean.append(value)
            if dropped is not None:
                repairs.append(Repair(keyword, Action.DROPPED, dropped))
                setattr(out, keyword, "")
                continue
            repairs += [Repair(keyword, Action.REPAIRED, p) for p in dict.fromkeys(fixes)]
            non_ascii = non_ascii or any(not v.isascii() for v in clean)
            if vr == "PN":
                out.add_new(tag, vr, [PersonName(v) for v in clean] if len(clean) > 1
                            else (PersonName(clean[0]) if clean else ""))
            else:
                out.add_new(tag, vr, clean if len(clean) > 1 else (clean[0] if clean else ""))
    if non_ascii:
        out.SpecificCharacterSet = UTF8
    return Sanitized(out, tuple(repairs))
