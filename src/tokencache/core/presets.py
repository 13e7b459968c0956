"""The preset registry: named official settings, each owned by one config class.

A config class that takes presets derives from :class:`PresetMixin`; the file that knows a setting registers it
with :meth:`PresetMixin.register_presets` (a method's own, model-agnostic settings in ``methods/``, a model
family's published ones in ``models/``). :func:`preset` and :func:`presets` search every such class, so nothing
here names a method.
"""

from __future__ import annotations

from typing import Any, ClassVar

Presets = dict[str, tuple[str, dict[str, Any]]]
"""Preset name -> (one-line description, the config's field values)."""


class PresetMixin:
    """``Config.preset(name)`` and the listing behind ``tc.presets()``. Each subclass holds its own ``_PRESETS``."""

    _PRESETS: ClassVar[Presets]

    @classmethod
    def register_presets(cls, presets: Presets) -> None:
        """Register named settings of this config class."""
        cls._PRESETS.update(presets)

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The official settings registered under ``name``; keyword arguments override fields."""
        if name not in cls._PRESETS:
            owner = next((c for c in _owners() if name in c._PRESETS), None)
            hint = (f": {name!r} is a {owner.__name__} preset, use {owner.__name__}.preset({name!r}) or "
                    f"tc.preset({name!r})") if owner is not None else ""
            raise ValueError(f"{cls.__name__}.preset name must be one of {sorted(cls._PRESETS)}; got {name!r}{hint}")
        _, values = cls._PRESETS[name]
        return cls(**{**values, **overrides})


def _owners() -> list[type[PresetMixin]]:
    """The config classes that take presets, in the order they were defined."""
    return [cls for cls in PresetMixin.__subclasses__() if "_PRESETS" in vars(cls)]


def presets() -> dict[str, str]:
    """Every preset name, with the config class that takes it and a one-line description."""
    listing: dict[str, str] = {}
    for cls in _owners():
        for name, (description, _) in cls._PRESETS.items():
            listing[name] = f"{cls.__name__}: {description}"
    return listing


def preset(name: str):
    """Build the config registered under ``name``, whichever config class owns it."""
    for cls in _owners():
        if name in cls._PRESETS:
            return cls.preset(name)
    owned = "; ".join(f"{cls.__name__}: {sorted(cls._PRESETS)}" for cls in _owners())
    raise ValueError(f"preset name must be one of {sorted(presets())} ({owned}); got {name!r}")
