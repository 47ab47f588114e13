"""A file's own column names for the columns a pipeline's stages read.

Exports come with their own headers (MovieLens' ``userId``, a help desk's
``instruction``); a ``columns`` section in the config names them, so the file is
used as it is rather than rewritten. A missing column's error lists the file's
header and the config key to set, with the near name it found.
"""

from __future__ import annotations

import re
from typing import ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from keel.errors import DataError


class ColumnNames(BaseModel):
    """Base of a pipeline's ``columns`` config: one field per column the stages read, valued with the file's
    name for it (``None``: ignore the file's column). A field in ``OPTIONAL`` left at its default name may be
    absent from the file; named otherwise, it is expected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _distinct(self) -> ColumnNames:
        names = [name for name in self.model_dump().values() if name is not None]
        if len(set(names)) < len(names):
            raise ValueError(f"each column needs its own name, got {self.model_dump()}")
        return self

    def select(self, frame: pd.DataFrame, origin: str, config_key: str) -> pd.DataFrame:
        """The file's columns under the stages' names, the others dropped; a DataError for a missing one."""
        wanted = {ours: theirs for ours, theirs in self.model_dump().items() if theirs is not None}
        for ours in self.OPTIONAL & set(wanted):
            if wanted[ours] == type(self).model_fields[ours].default and wanted[ours] not in frame.columns:
                del wanted[ours]
        missing = [ours for ours, theirs in wanted.items() if theirs not in frame.columns]
        if missing:
            near = {name_key(column): str(column) for column in frame.columns}
            keys = ", ".join(f"{ours}: {near.get(name_key(wanted[ours]), '<your column>')}" for ours in missing)
            raise DataError(f"{origin}: missing column(s) {[wanted[ours] for ours in missing]}; the file has "
                            f"{[str(c) for c in frame.columns][:20]}. Name yours in the config's {config_key} "
                            f"({keys}).")
        return frame[list(wanted.values())].set_axis(list(wanted), axis=1)


def name_key(name: object) -> str:
    """A name without case or punctuation: ``userId``, ``user_id`` and ``User ID`` are one (how a near name in
    a file is recognised, here and by contract validation)."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())
