"""Messages of the wire protocol and the one cattrs converter that (un)structures them.

The converter is strict, because it validates what arrives from the socket: cattrs would
otherwise turn ``5`` into ``"5"`` for a ``str`` field, ``"7"`` into ``7`` for an ``int``, and
``"eth0"`` into ``["e", "t", "h", "0"]`` for a ``list[str]``. Every failure is reported with the
path of the bad field as it is spelt on the wire (``expected str @ $.env.CNI_IFNAME``).

Other packages register their own classes on ``converter`` (``register_wire_names`` for classes
whose wire keys differ from the attribute names) and decode with ``structure``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar, get_origin

import attrs
import cattrs
from cattrs.cols import (
    is_mapping,
    is_mutable_sequence,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import AttributeValidationNote, BaseValidationError, ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import make_converter
from cattrs.v import format_exception

from rpc.errors import DecodeError

__all__ = [
    "CniEnv",
    "CniParams",
    "ErrorBody",
    "Peer",
    "Request",
    "converter",
    "register_wire_names",
    "structure",
    "unstructure",
]

T = TypeVar("T")

converter = make_converter()


@attrs.frozen(kw_only=True)
class Request:
    """``{"id": n, "method": "cni.add", "params": {...}}``."""

    id: int
    method: str
    params: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class ErrorBody:
    """The ``error`` member of an error reply."""

    code: int
    msg: str
    details: str = ""


@attrs.frozen(kw_only=True)
class Peer:
    """Credentials of the process at the other end of a connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@attrs.frozen(kw_only=True)
class CniEnv:
    """The CNI_* environment the runtime gave the plugin, forwarded as is."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: str = ""


@attrs.frozen(kw_only=True)
class CniParams:
    """Params of the ``cni.*`` methods: the plugin's environment and its parsed config."""

    env: CniEnv
    config: dict[str, Any]
    # The plugin's start and connect stamps (CLOCK_MONOTONIC ns) for the phase trace.
    trace: tuple[int, ...] = ()


def structure(obj: Any, cls: type[T]) -> T:
    """Return ``obj`` (decoded JSON) structured as ``cls``.

    Raises DecodeError whose details list every bad field with its path, ``; ``-separated.
    """
    try:
        return converter.structure(obj, cls)
    except BaseValidationError as e:
        raise DecodeError("; ".join(cattrs.transform_error(e))) from None
    except Exception as e:
        # The top level itself is wrong (not an object): cattrs has no field to name.
        raise DecodeError(f"{format_exception(e, cls)} @ $") from None


def unstructure(obj: Any) -> Any:
    """Return ``obj`` as JSON-able builtins (dicts, lists, str, numbers, bool, None)."""
    return converter.unstructure(obj)


def register_wire_names(cls: type[Any], **wire_names: str) -> None:
    """Make ``cls`` travel with the given wire keys (``attr_name="WIRE_KEY"``).

    Both directions are registered, and decode errors name the wire key. Unknown keys in the
    input are ignored. Returns nothing.
    """
    # Typed as Any: mypy cannot tell these **kwargs from make_dict_*_fn's flag parameters.
    overrides: dict[str, Any] = {name: override(rename=key) for name, key in wire_names.items()}
    generated = make_dict_structure_fn(cls, converter, **overrides)

    def structure_renamed(obj: Any, cl: type[Any]) -> Any:
        _require_mapping(obj, cl)
        try:
            return generated(obj, cl)
        except ClassValidationError as e:
            for sub in e.exceptions:
                notes = getattr(sub, "__notes__", [])
                sub.__notes__ = [_renamed(note, wire_names) for note in notes]
            raise

    converter.register_structure_hook(cls, structure_renamed)
    converter.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, converter, **overrides))


def _renamed(note: Any, wire_names: Mapping[str, str]) -> Any:
    if isinstance(note, AttributeValidationNote) and note.name in wire_names:
        return AttributeValidationNote(str(note), wire_names[note.name], note.type)
    return note


def _require_mapping(obj: Any, cl: type[Any]) -> None:
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an object for {cl!r}, got {type(obj).__name__}")


def _strict_str(obj: Any, cl: type[Any]) -> Any:
    if not isinstance(obj, str):
        raise TypeError(f"expected a string, got {type(obj).__name__}")
    return obj if cl is str else cl(obj)


def _strict_int(obj: Any, cl: type[Any]) -> Any:
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise TypeError(f"expected an integer, got {type(obj).__name__}")
    return obj if cl is int else cl(obj)


def _strict_float(obj: Any, cl: type[Any]) -> Any:
    if not isinstance(obj, int | float) or isinstance(obj, bool):
        raise TypeError(f"expected a number, got {type(obj).__name__}")
    return float(obj) if cl is float else cl(obj)


def _strict_bool(obj: Any, cl: type[Any]) -> Any:
    if not isinstance(obj, bool):
        raise TypeError(f"expected a boolean, got {type(obj).__name__}")
    return obj


def _strict_list_factory(cl: Any, conv: cattrs.BaseConverter) -> Callable[[Any, Any], Any]:
    base = list_structure_factory(cl, conv)

    def structure_list(obj: Any, t: Any) -> Any:
        if not isinstance(obj, list | tuple):
            raise TypeError(f"expected an array, got {type(obj).__name__}")
        return base(obj, t)

    return structure_list


def _strict_mapping_factory(cl: Any, conv: cattrs.BaseConverter) -> Callable[[Any, Any], Any]:
    # Not conv.gen_structure_mapping: that registers its hook directly for ``cl``, and direct
    # hooks win over this factory, so the check below would vanish after first use.
    structure_to = get_origin(cl) or cl
    if structure_to in (Mapping, MutableMapping):
        structure_to = dict
    base = mapping_structure_factory(cl, conv, structure_to)

    def structure_mapping(obj: Any, t: Any) -> Any:
        _require_mapping(obj, t)
        return base(obj, t)

    return structure_mapping


def _strict_attrs_factory(cl: Any, conv: cattrs.BaseConverter) -> Callable[[Any, Any], Any]:
    base = make_dict_structure_fn(cl, conv)

    def structure_attrs(obj: Any, t: Any) -> Any:
        _require_mapping(obj, t)
        return base(obj, t)

    return structure_attrs


# Registered with singledispatch (as cattrs does for its own primitives), so subclasses such as
# IntEnum and StrEnum go through the same check and are then built with ``cl(obj)``.
converter.register_structure_hook(str, _strict_str)
converter.register_structure_hook(int, _strict_int)
converter.register_structure_hook(float, _strict_float)
converter.register_structure_hook(bool, _strict_bool)
converter.register_structure_hook_factory(is_mutable_sequence, _strict_list_factory)
converter.register_structure_hook_factory(is_mapping, _strict_mapping_factory)
converter.register_structure_hook_factory(attrs.has, _strict_attrs_factory)

register_wire_names(
    CniEnv,
    command="CNI_COMMAND",
    container_id="CNI_CONTAINERID",
    netns="CNI_NETNS",
    ifname="CNI_IFNAME",
    args="CNI_ARGS",
    path="CNI_PATH",
)
