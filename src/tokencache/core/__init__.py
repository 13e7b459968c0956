"""The machinery every caching method shares: the engine, the diffusers hooks, the per-run state, ``tc.apply``,
block layouts, FLOP counting, scoring attention processors, forecasting, the policy protocol, validation and
the preset registry.

Nothing here imports :mod:`tokencache.methods` or :mod:`tokencache.models`: a method reaches the engine through
its config (``build_policy``, ``build_selector``), a model family through the layout and shape registries.
"""
