"""Replace personal data in free text with typed placeholders, and pseudonymise user ids.

Runs in preprocessing, before any text is stored, logged or tokenized: the
artifact store, MLflow and the served model only ever see ``<EMAIL>``,
``<PHONE>``, ``<CARD>``, ``<ORDER_ID>`` and ``<NAME>``. Order matters: cards
before phones (both are digit runs), emails before names.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
PHONE = re.compile(r"(?<![\w+])(?:\+?\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{3,4}[ .-]?\d{3,4}(?:[ .-]?\d{2,4})?\b")
ORDER_ID = re.compile(r"(?:\b(?:ORD|ord|Ord)[-_ ]?\d{4,10}\b|#\d{5,10}\b)")
NAME_INTRO = re.compile(r"\b(?P<intro>(?:[Mm]y name is|[Tt]his is|[Ii]t'?s|[Ii] am|[Ii]'m|[Nn]ame:)\s+)"
                        r"(?P<name>[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)")
# Two or more capitalised words in a row ("Grace Nguyen"): what survives a typo in the introduction.
FULL_NAME = re.compile(r"\b[A-Z][a-z]+(?:[ -][A-Z][a-z]+)+\b")
PATTERNS = (("EMAIL", EMAIL), ("CARD", CARD), ("ORDER_ID", ORDER_ID), ("PHONE", PHONE))


@dataclass
class ScrubReport:
    """How many of each kind were replaced: logged instead of the values themselves."""

    replaced: Counter[str] = field(default_factory=Counter)


def scrub(text: str, report: ScrubReport | None = None) -> str:
    """``text`` with every email, card-like number, order id, phone number and introduced name replaced."""
    for kind, pattern in PATTERNS:
        text, count = pattern.subn(f"<{kind}>", text)
        if report is not None and count:
            report.replaced[kind] += count

    def name(match: re.Match[str]) -> str:
        if report is not None:
            report.replaced["NAME"] += 1
        return f"{match['intro']}<NAME>"

    text = NAME_INTRO.sub(name, text)
    return FULL_NAME.sub(lambda match: name_only(match, report), text)


def name_only(match: re.Match[str], report: ScrubReport | None) -> str:
    if report is not None:
        report.replaced["NAME"] += 1
    return "<NAME>"


def pseudonymise(user_id: str, key: bytes) -> str:
    """A keyed hash: stable per user (so per-user splits still work), not reversible without ``key``."""
    return "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:16]
