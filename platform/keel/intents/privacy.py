"""Replace personal data in free text with typed placeholders, and pseudonymise user ids.

Runs in preprocessing, before any text is stored, logged or tokenized: the
artifact store, MLflow and the served model only ever see ``<EMAIL>``,
``<IBAN>``, ``<CARD>``, ``<SSN>``, ``<ORDER_ID>``, ``<PHONE>`` and ``<NAME>``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial


def _letter_class(accepts: Callable[[str], bool]) -> str:
    """A regex character class of the Basic Multilingual Plane's letters that ``accepts`` takes, as ranges:
    names are not ASCII (Müller, Nguyễn, Łukasz), and ``re`` has no Unicode case classes."""
    ranges: list[list[int]] = []
    for code in range(0x10000):
        if accepts(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges) + "]"


UPPER, LOWER = _letter_class(str.isupper), _letter_class(str.islower)
# A capitalised name word: Anna, Müller, O'Brien, McDonald, Nguyễn.
NAME_WORD = rf"(?:{UPPER}['’])?{UPPER}{LOWER}+(?:{UPPER}{LOWER}+)?"
# Lower-case particles inside a full name: Maria de la Cruz, Ludwig van Beethoven.
PARTICLE = r"(?:van|von|der|den|de|da|di|du|del|della|la|le|dos|das|bin|ibn|al)"
# Any word after an explicit introduction, whatever its case ("my name is john smith").
ANY_WORD = r"[^\W\d_]+(?:['’-][^\W\d_]+)*"
# Words that follow "my name is" without being a name ("my name is spelled wrong").
NOT_A_NAME = (r"(?i:not|no|on|in|and|or|but|the|a|an|is|was|wrong|missing|spelled|misspelled|incorrect|still|also|"
              r"different|correct|changed|now|listed|shown|please|i|my|for|with|at|to|under|same|blank|empty)\b")

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
ORDER_ID = re.compile(r"(?:\b(?:ORD|ord|Ord)[-_ ]?\d{4,10}\b|#\d{5,10}\b)")
# +44 20 7946 0958, +1 (555) 123-4567: a country code, then groups; at least 8 digits in all.
INTERNATIONAL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}\b")
PHONE = re.compile(r"(?<![\w+])(?:\+?\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{3,4}[ .-]?\d{3,4}(?:[ .-]?\d{2,4})?\b")
CAPITALISED_INTRO = re.compile(rf"\b(?P<intro>(?:[Tt]his is|[Ii]t'?s|[Ii] am|[Ii]'m|[Cc]all me)\s+)"
                               rf"(?P<name>{NAME_WORD}(?:[ -]{NAME_WORD})?)")
EXPLICIT_INTRO = re.compile(rf"\b(?P<intro>(?:[Mm]y name is|[Nn]ame is|[Nn]ame:)\s+)(?!{NOT_A_NAME})"
                            rf"(?P<name>{ANY_WORD}(?:\s+(?!{NOT_A_NAME}){ANY_WORD})?)")
# Two or more capitalised words in a row ("Grace Nguyen", "Nguyễn Văn An"), with or without an introduction.
FULL_NAME = re.compile(rf"\b{NAME_WORD}(?:(?:[ -]{PARTICLE})*[ -]{NAME_WORD})+\b")
# Order matters: IBANs and cards before phones (all digit runs), emails before names.
PATTERNS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("EMAIL", EMAIL, None), ("IBAN", IBAN, None), ("CARD", CARD, None), ("SSN", SSN, None),
    ("ORDER_ID", ORDER_ID, None), ("PHONE", INTERNATIONAL_PHONE, lambda found: sum(map(str.isdigit, found)) >= 8),
    ("PHONE", PHONE, None))


@dataclass
class ScrubReport:
    """How many of each kind were replaced: logged instead of the values themselves."""

    replaced: Counter[str] = field(default_factory=Counter)

    def count(self, kind: str) -> None:
        self.replaced[kind] += 1


def scrub(text: str, report: ScrubReport | None = None) -> str:
    """``text`` with every email, IBAN, card-like number, social security number, order id, phone number and
    introduced or full name replaced by its kind."""
    counted = report or ScrubReport()
    for kind, pattern, accepts in PATTERNS:
        text = pattern.sub(partial(_placeholder, kind=kind, accepts=accepts, report=counted), text)

    def introduced(match: re.Match[str]) -> str:
        counted.count("NAME")
        return f"{match['intro']}<NAME>"

    # Full names first, so an introduction's two-word limit never leaves a third name part behind.
    text = FULL_NAME.sub(partial(_placeholder, kind="NAME", accepts=None, report=counted), text)
    text = CAPITALISED_INTRO.sub(introduced, text)
    return EXPLICIT_INTRO.sub(introduced, text)


def _placeholder(match: re.Match[str], kind: str, accepts: Callable[[str], bool] | None, report: ScrubReport) -> str:
    if accepts is not None and not accepts(match[0]):
        return match[0]
    report.count(kind)
    return f"<{kind}>"


def pseudonymise(user_id: str, key: bytes) -> str:
    """A keyed hash: stable per user (so per-user splits still work), not reversible without ``key``."""
    return "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:16]
