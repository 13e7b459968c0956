"""The caching methods, one file each: its config, step policy, token selector and model-agnostic presets.

Adding a method is adding a file here whose config has ``build_policy`` and ``build_selector`` (see
:class:`tokencache.core.schedule.CachePolicy`); methods import :mod:`tokencache.core`, never the reverse.
"""
