"""Frozen, slotted dataclasses built without their generated ``__init__``, for the hot paths only.

Why: a frozen dataclass's ``__init__`` sets each field with a Python-level ``object.__setattr__`` (the
frozen guard): for State's 40 fields that was a tenth of a leader's core step, and three times what setting
the slots of a decoded Append costs. Setting the slots through their descriptors gives the same object.

Only for classes whose ``__init__`` does nothing else: every field an init field, no ``__post_init__``, no
``__dict__``. :func:`slot_setters` checks that when a module is imported, so a later change to a class
cannot silently skip its own code. The replication core (``machine``: State, Ready, Progress) and the
frame codec (``node.replication.codec``: the common messages) both build through it.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import fields
from itertools import repeat
from typing import Any

_discard = deque(maxlen=0).extend  # runs an iterator to its end, keeping nothing


def slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """The bound ``__set__`` of each slot of ``cls``, in field order; TypeError for a class whose
    ``__init__`` would do more than set them."""
    if not all(f.init for f in fields(cls)) or hasattr(cls, "__post_init__") or "__dict__" in dir(cls):
        raise TypeError(f"{cls.__name__}: not a plain frozen slotted dataclass")
    return tuple(cls.__dict__[f.name].__set__ for f in fields(cls))


def slot_builder(cls: type) -> Callable[[Sequence[object]], Any]:
    """``values -> cls(*values)`` without ``__init__`` (the setters called by ``map``: no Python frame per
    field). ``values`` must hold every field, in field order: a short sequence would leave slots unset."""
    setters = slot_setters(cls)
    new = object.__new__

    def build(values: Sequence[object]) -> Any:
        obj = new(cls)
        _discard(map(operator.call, setters, repeat(obj), values))
        return obj

    return build
