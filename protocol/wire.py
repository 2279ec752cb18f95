"""The base of the hot-path messages: a msgspec Struct, and its JSON codec.

Built every step by the scheduler and the worker, these messages are plain Structs: a keyword constructor
stores the values as given (no validation, ~0.1 us). Types, enums and unknown fields are checked where a
message crosses a process boundary, by ``decode`` (msgspec's typed decoder: a malformed message raises
``msgspec.ValidationError``, a ValueError that names the field, e.g. "Expected `int`, got `str` - at
`$.scheduled[0].num_tokens`").

The wire form leaves default values out (a decode step's plan is mostly empty lists and False), which is
what ``encode`` writes. User input that needs pydantic's validation (``SamplingParams``) can sit inside
a message: it is written through its ``model_dump`` and read back through ``model_validate``, once per
message that carries it (a new sequence), never per step.

``Message`` also answers the few pydantic methods the layers call (``model_dump``, ``model_dump_json``,
``model_validate``, ``model_validate_json``, ``model_copy``) with pydantic's meaning, so a caller need
not know which kind of message it holds.
"""

from __future__ import annotations

import copy
import functools
from enum import Enum
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel

T = TypeVar("T")

ValidationError = msgspec.ValidationError


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_defaults=True)
    raise TypeError(f"cannot encode objects of type {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if isinstance(typ, type) and issubclass(typ, BaseModel):
        return typ.model_validate(obj)  # a pydantic ValidationError is a ValueError: msgspec adds the path
    raise NotImplementedError(f"cannot decode objects of type {typ!r}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


@functools.lru_cache(maxsize=None)
def _decoder(typ: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(typ, dec_hook=_dec_hook)


def encode(msg: Any) -> bytes:
    """The wire form of a message: JSON without default values."""
    return _encoder.encode(msg)


def decode(raw: bytes | str, typ: type[T]) -> T:
    """A message of type ``typ`` from its JSON, validated (types, enums, unknown fields, nested pydantic
    models). Raises ``msgspec.ValidationError`` (a ValueError) on a malformed message."""
    return _decoder(typ).decode(raw)


def convert(obj: Any, typ: type[T]) -> T:
    """A message of type ``typ`` from builtins (dicts, lists, ...), validated like ``decode``."""
    return msgspec.convert(obj, typ, dec_hook=_dec_hook)


@functools.lru_cache(maxsize=None)
def _struct_fields(cls: type) -> tuple:
    """msgspec.structs.fields of a class, once (it evaluates the annotations on every call: ~50 us)."""
    return msgspec.structs.fields(cls)


def to_builtins(obj: Any, json: bool = False, exclude_none: bool = False, exclude_defaults: bool = False) -> Any:
    """pydantic's ``model_dump`` of a message: every field (unless excluded), nested messages as dicts;
    with ``json`` enums as their values and tuples as lists."""
    if isinstance(obj, msgspec.Struct):
        out = {}
        for f in _struct_fields(type(obj)):
            v = getattr(obj, f.name)
            if exclude_none and v is None:
                continue
            if exclude_defaults and _is_default(f, v):
                continue
            out[f.name] = to_builtins(v, json, exclude_none, exclude_defaults)
        return out
    if isinstance(obj, list):
        return [to_builtins(v, json, exclude_none, exclude_defaults) for v in obj]
    if isinstance(obj, tuple):
        t = [to_builtins(v, json, exclude_none, exclude_defaults) for v in obj]
        return t if json else tuple(t)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json" if json else "python", exclude_none=exclude_none,
                              exclude_defaults=exclude_defaults)
    if json and isinstance(obj, Enum):
        return obj.value
    return obj


def _is_default(f: msgspec.structs.FieldInfo, v: Any) -> bool:
    if f.default is not msgspec.NODEFAULT:
        return v == f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return v == f.default_factory()
    return False


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A hot-path message: mutable, compared field by field. (msgspec does not inherit ``kw_only``: each
    message class passes ``kw_only=True`` itself, so its constructor takes keywords only, like pydantic's.)"""

    # ---- pydantic's names, pydantic's meaning ------------------------------------------------
    def model_dump(self, *, mode: str = "python", exclude_none: bool = False,
                   exclude_defaults: bool = False) -> dict[str, Any]:
        return to_builtins(self, mode == "json", exclude_none, exclude_defaults)

    def model_dump_json(self, *, exclude_none: bool = False, exclude_defaults: bool = False) -> str:
        if exclude_defaults and not exclude_none:
            return encode(self).decode()
        return msgspec.json.encode(to_builtins(self, True, exclude_none, exclude_defaults)).decode()

    @classmethod
    def model_validate(cls: type[T], obj: Any) -> T:
        return obj if isinstance(obj, cls) else convert(obj, cls)

    @classmethod
    def model_validate_json(cls: type[T], raw: bytes | str) -> T:
        return decode(raw, cls)

    def model_copy(self: T, *, update: dict[str, Any] | None = None, deep: bool = False) -> T:
        out = copy.deepcopy(self) if deep else self
        return msgspec.structs.replace(out, **(update or {}))
