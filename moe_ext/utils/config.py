"""A mixin for dataclass configs that are saved as JSON objects beside their weights."""
from __future__ import annotations

import dataclasses
import math


class DictConfig:
    """to_dict / from_dict for a dataclass; from_dict refuses unknown fields by name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be read from a JSON object, got "
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**data)


MAX_INT = 2 ** 31 - 1  # every int field of a config is a size, a count or an index


def is_int(value) -> bool:
    """An int read from JSON or given in code (not a bool, not a float, not a string), of
    magnitude at most MAX_INT: a size of 10**100 in a config is refused by name, not an
    overflow deep inside torch."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT


def is_real(value) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
