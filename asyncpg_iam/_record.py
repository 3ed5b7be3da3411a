"""`Record`, the base of the public settings values: frozen, slotted, compared field by field.

`IAMAuth`, `Credentials`, `SigningTarget` and `HealthCheck` are made on every cold start, and a
dataclass compiles its generated methods when its class is built: about 0.8 ms a class, and 1 ms
more to import `dataclasses`, paid again by every new Lambda instance. These classes share the
methods below instead, written once. Each subclass names its fields in `_fields`, in the
constructor's order, makes them its `__slots__`, and sets them with `_assign` in its own
``__init__``, which checks them.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn, TypeVar

__all__ = ["Record"]

_R = TypeVar("_R", bound="Record")


class Record:
    """A frozen value: immutable after ``__init__``, equal when its compared fields are equal,
    hashable, shown as ``Name(field=value, ...)``, copied changed with `replace`."""

    __slots__ = ()
    #: The fields, in the constructor's order.
    _fields: ClassVar[tuple[str, ...]] = ()
    #: Fields the repr leaves out (secrets).
    _unshown: ClassVar[frozenset[str]] = frozenset()
    #: Fields that equality and the hash ignore.
    _uncompared: ClassVar[frozenset[str]] = frozenset()

    def _assign(self, *values: object) -> None:
        """Set the fields, in `_fields`' order, once (from ``__init__``)."""
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def replace(self: _R, **changes: Any) -> _R:
        """Return a copy with `changes` applied, checked as the constructor checks them."""
        values = {name: getattr(self, name) for name in self._fields}
        unknown = sorted(changes.keys() - values.keys())
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        values.update(changes)
        return type(self)(**values)

    # `copy.replace(value, ...)` (Python 3.13) calls this.
    __replace__ = replace

    def _compared(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields if name not in self._uncompared)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            assert isinstance(other, Record)
            return self._compared() == other._compared()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._unshown
        )
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(
            f"{type(self).__name__} is immutable: use .replace({name}=...) for a changed copy"
        )

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle and copy rebuild through the constructor, which checks the values again.
        return (_rebuild, (type(self), {name: getattr(self, name) for name in self._fields}))


def _rebuild(cls: type[_R], values: dict[str, Any]) -> _R:
    return cls(**values)
