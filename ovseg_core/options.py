"""Config fields added after a method's first release.

A stage key hashes every field of the config its stage reads (``storage.keys``). A field that
joins a config later would move the key of every existing configuration, and every store would
recompute outputs that did not change. A field declared with :func:`later_option` is left out
of stage keys while it holds its default, so adding an option never invalidates stored outputs;
set to any other value it is hashed like every other field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["KEY_OMIT_DEFAULT", "later_option"]

# Field metadata read by ``storage.keys.to_jsonable``: leave the field out of keys at its default.
KEY_OMIT_DEFAULT = "ovseg_key_omit_default"


def later_option(default: Any) -> Any:
    """A dataclass field with ``default`` that stage keys leave out while it holds that default."""
    return dataclasses.field(default=default, metadata={KEY_OMIT_DEFAULT: True})
