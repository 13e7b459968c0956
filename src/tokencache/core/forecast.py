"""Token-wise forecasting: extrapolate a stale token's cached feature instead of reusing it as it is.

Per cacheable module and per token the cache keeps the value computed last, finite-difference estimates of
its derivatives up to ``order`` and the position (step or timestep) at which *that token* was computed.
A token that is not recomputed gets an expansion of its own history: TaylorSeer's
``F(p) = F0 + sum_j Fj (p - p_last)^j / j!`` (ICCV 2025, per module) or Newton's divided-difference form; a
recomputed token
updates its value and its differences with its own step distance, so token-wise partial computation and
forecasting combine. With no token recomputed between full steps this is a module-level TaylorSeer; with
``order=0`` nothing is forecast and the cache behaves exactly as the reusing one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .validation import CACHE_DTYPES, check_number, field_error

ForecastAxis = Literal["step", "timestep"]
FORECAST_AXES: tuple[str, ...] = ("step", "timestep")
TokenUpdate = Literal["anchor", "differences"]
Expansion = Literal["taylor", "newton"]
EXPANSIONS: tuple[str, ...] = ("taylor", "newton")
TOKEN_UPDATES: tuple[str, ...] = ("anchor", "differences")
ForecastTarget = Literal["modules", "output"]
FORECAST_TARGETS: tuple[str, ...] = ("modules", "output")


@dataclass(frozen=True)
class ForecastConfig:
    """How stale tokens are forecast (``forecast=`` of ToCaConfig, FORAConfig and TokenCacheConfig)."""

    order: int = 1
    """Highest derivative of the Taylor expansion, 0-4. 0 reuses the cached value (plain ToCa / FORA)."""
    axis: ForecastAxis = "step"
    """What the expansion runs over: ``step`` (model evaluations: the distance between two computations is
    a number of steps) or ``timestep`` (the scheduler's timestep values, so uneven step spacings are
    followed)."""
    dtype: torch.dtype | None = None
    """Storage dtype of the derivative estimates; ``None`` keeps the cache's dtype. bfloat16 halves their
    memory (diffusers' TaylorSeer default)."""
    expansion: Expansion = "taylor"
    """``taylor``: TaylorSeer's ``sum_j Dj x^j / j!`` with ``Dj`` the j-th difference divided by the last
    step distance ``j`` times (what diffusers' TaylorSeer hook computes). ``newton``: Newton's divided
    differences over the token's last ``order + 1`` computations, ``sum_j f[p0..pj] (p - p0)...(p - p(j-1))``,
    exact for features that are polynomials of degree <= ``order`` in the axis, at any spacing."""
    clusters: int = 0
    """ClusCa-style correction (ACM MM 2025): at full steps each module's tokens are grouped into this many
    k-means clusters of its output; a partial step spreads its recomputed tokens over the clusters and adds
    each cluster's mean forecast error, measured on its recomputed tokens, to the forecasts of its other
    tokens. 0 turns it off."""
    cluster_weight: float = 1.0
    """Fraction of its cluster's measured forecast error added to a token's forecast."""
    token_update: TokenUpdate = "anchor"
    """What a token recomputed on a partial step updates. ``anchor``: its value and position, keeping the
    derivative estimates of the last full computation (the expansion restarts from the fresh value).
    ``differences``: its derivative estimates too, by divided differences over its own step distance."""
    target: ForecastTarget = "modules"
    """What is forecast. ``modules``: every cacheable module's output, token by token; the blocks still run
    around them. ``output``: the transformer's output as a whole, and a step that recomputes nothing does
    not run the transformer at all (diffusers' TaylorSeer "lite" mode, which forecasts ``proj_out`` and
    skips the blocks, gives the same images). Its forecast steps cost next to nothing; its forecasts are
    coarser. Only for schedules whose steps are either full or recompute nothing (FORA's)."""

    def __post_init__(self) -> None:
        cls = type(self)
        check_number(cls, "order", self.order, 0, 4, integer=True)
        if self.axis not in FORECAST_AXES:
            raise field_error(cls, "axis", f"one of {FORECAST_AXES}", self.axis)
        if self.dtype is not None and self.dtype not in CACHE_DTYPES:
            raise field_error(cls, "dtype", "None (the cache's dtype) or one of torch.float32, torch.float16, "
                              "torch.bfloat16", self.dtype)
        if self.expansion not in EXPANSIONS:
            raise field_error(cls, "expansion", f"one of {EXPANSIONS}", self.expansion)
        check_number(cls, "clusters", self.clusters, 0, 256, integer=True)
        check_number(cls, "cluster_weight", self.cluster_weight, 0.0, 1.0)
        if self.token_update not in TOKEN_UPDATES:
            raise field_error(cls, "token_update", f"one of {TOKEN_UPDATES}", self.token_update)
        if self.target not in FORECAST_TARGETS:
            raise field_error(cls, "target", f"one of {FORECAST_TARGETS}", self.target)
        if self.target == "output" and (self.clusters or self.token_update != "anchor"):
            raise field_error(cls, "target", "'modules' with clusters or token_update='differences' (the output "
                              "target forecasts no token-wise state)", self.target)


def step_kind_without_compute(config: ForecastConfig | None) -> str:
    """The step kind (statistics and plans) of a step that recomputes no token: ``forecast`` when the cached
    values are extrapolated (order >= 1), ``reuse`` when they are copied."""
    return "forecast" if config is not None and config.order > 0 else "reuse"


def describe_forecast(config: ForecastConfig | None) -> str:
    """A short label such as ``newton order 2 (output)``; empty when nothing is extrapolated (no forecast, or
    order 0, which reuses the cached values)."""
    if step_kind_without_compute(config) == "reuse":
        return ""
    return f"{config.expansion} order {config.order} ({config.target})"


def check_forecast(cls: type, value: Any, output_target: bool = False) -> None:
    """The ``forecast`` field of a method's config: ``None`` or a :class:`ForecastConfig`; ``output_target``:
    whether the method's schedule allows ``target="output"`` (its steps are full or recompute nothing)."""
    if value is not None and not isinstance(value, ForecastConfig):
        raise field_error(cls, "forecast", "None or a ForecastConfig", value)
    if value is not None and value.target == "output" and not output_target:
        raise field_error(cls, "forecast", "a ForecastConfig with target='modules' (its partial steps recompute "
                          "tokens, so the transformer must run on them; target='output' is for FORAConfig)",
                          value)


def forecast_flops(config: ForecastConfig | None, full: bool, rows: int, num_tokens: int, width: int,
                   batch: int, score: str | None = None, token_wise: bool = True) -> int:
    """Element-wise FLOPs of forecasting in one module call: a full computation updates every token's
    differences, a cached one expands every token and (``token_update="differences"``) updates the ``rows``
    recomputed ones; each costs a multiply and an add per order and element. The cluster correction adds its
    k-means (5 iterations, distances and means) at full computations and a multiply-add per element at partial
    ones; the ``forecast_error`` score one more expansion at full computations, ``forecast_term`` one term per
    order and element at partial ones. A module cached whole (``token_wise=False``) has none of these three."""
    if config is None or config.order == 0:
        return 0
    updated = num_tokens if full else (rows if config.token_update == "differences" else 0)
    expanded = 0 if full else num_tokens
    flops = 2 * config.order * (expanded + updated) * width
    if not token_wise:
        return flops * batch
    if config.clusters:
        clusters = min(config.clusters, num_tokens)
        flops += 5 * 4 * num_tokens * clusters * width if full else (2 * num_tokens * width if rows else 0)
    if score == "forecast_error" and full:
        flops += 2 * config.order * num_tokens * width
    if score == "forecast_term" and not full and rows:
        flops += 2 * config.order * num_tokens * width
    return flops * batch


class TokenForecaster:
    """The forecasting arithmetic on one module's cache (:class:`tokencache.core.state.SlotState`).

    Per token the state keeps ``derivatives`` (the differences of orders 1..m), ``positions`` (B, n, m): the
    positions of its last ``m`` computations, newest first, and ``history``: how many computations it has had
    (capped at m + 1), which says which orders are known (an unknown one is 0)."""

    def __init__(self, config: ForecastConfig) -> None:
        self.config = config
        self.order = config.order
        self.newton = config.expansion == "newton"

    def _factor_dtype(self, value: torch.Tensor) -> torch.dtype:
        return self.config.dtype or value.dtype

    def update_all(self, state: Any, output: torch.Tensor, position: float) -> None:
        """Every token was computed at ``position`` (a full step); ``state.output`` still holds the old values."""
        batch, tokens = output.shape[:2]
        old = state.output
        if old is None or old.shape != output.shape or state.derivatives is None:
            state.derivatives = [torch.zeros(output.shape, dtype=self._factor_dtype(output), device=output.device)
                                 for _ in range(self.order)]
            state.positions = torch.full((batch, tokens, self.order), position, dtype=torch.float64,
                                         device=output.device)
            state.history = torch.ones((batch, tokens), dtype=torch.int8, device=output.device)
            state.uniform = ([position] * self.order, 1)
            return
        if state.uniform is not None:
            state.derivatives = self._uniform_differences(output, old, state.derivatives, *state.uniform, position)
            positions, history = state.uniform
            state.uniform = ([position, *positions[:-1]], min(history + 1, self.order + 1))
        else:
            new = self._differences(output, old, state.derivatives, state.history, state.positions, position)
            state.derivatives = [d.to(self._factor_dtype(output)) for d in new]
        state.positions = self._shifted(state.positions, position)
        state.history = (state.history + 1).clamp_(max=self.order + 1)

    def _uniform_differences(self, value: torch.Tensor, old: torch.Tensor, old_differences: list[torch.Tensor],
                             positions: list[float], history: int, position: float) -> list[torch.Tensor]:
        """:meth:`_differences` when every token shares its positions and history (no token was recomputed
        apart from the others since the last full step: FORA, TaylorSeer): scalar distances, no masks, which
        matters on small models where these element-wise passes cost as much as the module itself."""
        dtype = self._factor_dtype(value)
        compute = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        current = value.to(compute)
        previous = [old, *old_differences]
        new: list[torch.Tensor] = []
        for j in range(self.order):
            distance = position - positions[j if self.newton else 0]
            if distance == 0:  # a repeated timestep: keep the estimates
                return [*new, *old_differences[j:]]
            if j >= history:  # not enough computations yet for this order
                new += [torch.zeros_like(old_differences[j]) for _ in range(j, self.order)]
                return new
            current = torch.sub(current, previous[j].to(compute)).mul_(1.0 / distance)
            new.append(current.to(dtype))
        return new

    def update_rows(self, state: Any, index: torch.Tensor, fresh: torch.Tensor, position: float) -> None:
        """Tokens ``index`` (B, k) were recomputed at ``position``; call before ``state.output`` is updated."""
        state.uniform = None  # tokens now have histories of their own
        rows = index.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
        where = index.unsqueeze(-1).expand(-1, -1, self.order)
        positions = state.positions.gather(1, where)
        if self.config.token_update == "anchor":
            # The expansion restarts from the fresh value with the derivatives of the last full computation as
            # they are (shifting them to the new point by the expansion measured worse: 28.6 against 34.3 dB)
            positions[..., 0] = position
            state.positions = state.positions.scatter(1, where, positions)
            return
        history = state.history.gather(1, index)
        new = self._differences(fresh, state.output.gather(1, rows), [d.gather(1, rows) for d in state.derivatives],
                                history, positions, position)
        state.derivatives = [d.scatter(1, rows, n.to(d.dtype)) for d, n in zip(state.derivatives, new, strict=True)]
        state.positions = state.positions.scatter(1, where, self._shifted(positions, position))
        state.history = state.history.scatter(1, index, (history + 1).clamp_(max=self.order + 1))

    @staticmethod
    def _shifted(positions: torch.Tensor, position: float) -> torch.Tensor:
        """The newest-first positions with ``position`` in front."""
        front = torch.full_like(positions[..., :1], position)
        return torch.cat([front, positions[..., :-1]], dim=-1)

    def _differences(self, value: torch.Tensor, old: torch.Tensor, old_differences: list[torch.Tensor],
                     history: torch.Tensor, positions: torch.Tensor, position: float) -> list[torch.Tensor]:
        """The differences after a computation of ``value`` at ``position``: ``D(j+1) = (D(j)_new - D(j)_old) / h``
        with ``h`` the last step distance (taylor) or the distance to the computation ``j`` back (newton). An
        order needs one more past computation than the one below it (``history``), else it is 0; a zero
        distance (a repeated timestep) keeps the old estimates."""
        compute = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        current = value.to(compute)
        previous = [old.to(compute)] + [d.to(compute) for d in old_differences]
        new: list[torch.Tensor] = []
        for j in range(self.order):
            back = j if self.newton else 0
            distance = (position - positions[..., back]).unsqueeze(-1)
            moved = distance != 0
            safe = torch.where(moved, distance, torch.ones_like(distance)).to(compute)
            valid = (history > j).unsqueeze(-1) & moved
            difference = (current - previous[j]) / safe
            current = torch.where(valid, difference, torch.where(moved, torch.zeros_like(difference),
                                                                  previous[j + 1]))
            new.append(current)
        return new

    def predict(self, state: Any, position: float) -> torch.Tensor:
        """The expansion of every token at ``position``, in the module's output dtype."""
        dtype = state.output_dtype
        compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        if state.uniform is not None:
            return self._uniform_predict(state, position, compute).to(dtype)
        offsets = (position - state.positions).to(compute)  # (B, n, m): to each of the last m computations
        out = state.output.to(compute)
        weight = torch.ones_like(offsets[..., :1])
        for j, derivative in enumerate(state.derivatives, start=1):
            if self.newton:  # (p - p0)(p - p1)...(p - p(j-1))
                weight = weight * offsets[..., j - 1:j]
                term = weight
            else:  # (p - p0)^j / j!
                weight = weight * offsets[..., :1]
                term = weight / math.factorial(j)
            out = out + derivative.to(compute) * term
        return out.to(dtype)

    def _uniform_predict(self, state: Any, position: float, compute: torch.dtype) -> torch.Tensor:
        """:meth:`predict` with scalar coefficients (every token shares its positions): one fused pass per
        known order."""
        positions, history = state.uniform
        out = state.output.to(compute)
        weight = 1.0
        for j in range(1, min(history, self.order + 1)):
            if self.newton:
                weight *= position - positions[j - 1]
            else:
                weight *= (position - positions[0]) / j
            out = torch.add(out, state.derivatives[j - 1], alpha=weight) if j == 1 else \
                out.add_(state.derivatives[j - 1], alpha=weight)
        return out


def relative_error(value: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per token (B, n): ``|value - estimate| / |value|``."""
    value = value.float()
    return (value - estimate.float()).norm(dim=-1) / value.norm(dim=-1).clamp_min(1e-12)


def last_term_size(forecaster: TokenForecaster, state: Any, position: float) -> torch.Tensor:
    """Per token (B, n): the size of the highest known term of its expansion at ``position`` relative to its
    value: how far the forecast leans on its least reliable estimate."""
    order = forecaster.order
    positions = state.positions.float()
    offsets = position - positions  # (B, n, m)
    if forecaster.newton:
        weight = offsets.cumprod(dim=-1)
    else:
        powers = offsets[..., :1] ** torch.arange(1, order + 1, device=offsets.device)
        weight = powers / torch.tensor([math.factorial(j) for j in range(1, order + 1)], device=offsets.device)
    known = (state.history.long() - 1).clamp(min=0, max=order)  # orders with an estimate
    size = torch.zeros(state.output.shape[:2], device=state.output.device)
    for j in range(order):
        term = state.derivatives[j].float().norm(dim=-1) * weight[..., j].abs()
        size = torch.where(known == j + 1, term, size)
    return size / state.output.float().norm(dim=-1).clamp_min(1e-12)


def kmeans(features: torch.Tensor, clusters: int, iterations: int = 5, seed: int = 0) -> torch.Tensor:
    """Per sample, cluster indices (B, n) of k-means over the tokens ``features`` (B, n, D)."""
    batch, tokens, _ = features.shape
    clusters = min(clusters, tokens)
    x = features.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.stack([torch.randperm(tokens, generator=g)[:clusters] for _ in range(batch)]).to(x.device)
    centres = x.gather(1, start.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=-1)
        one_hot = torch.nn.functional.one_hot(assign, clusters).float()  # (B, n, K)
        counts = one_hot.sum(1).clamp_min(1.0)
        centres = torch.where(one_hot.sum(1).unsqueeze(-1) > 0, one_hot.transpose(1, 2) @ x / counts.unsqueeze(-1),
                              centres)
    return torch.cdist(x, centres).argmin(dim=-1)


def spread_over_clusters(score: torch.Tensor, assign: torch.Tensor, k: int, clusters: int) -> torch.Tensor:
    """Top-``k`` tokens (B, k) taking the best-scored ones of each cluster in turn (round-robin by rank within
    its cluster), so every cluster gets recomputed tokens before any gets a second."""
    order = score.argsort(dim=-1, descending=True)
    sorted_assign = assign.gather(1, order)
    one_hot = torch.nn.functional.one_hot(sorted_assign, clusters)
    rank = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # rank of each token within its cluster, by score
    position = torch.arange(score.shape[1], device=score.device).expand_as(rank)
    key = rank * score.shape[1] + position  # round-robin: rank first, then score order
    chosen = key.argsort(dim=-1)[:, :k]
    return order.gather(1, chosen)


def cluster_correction(assign: torch.Tensor, index: torch.Tensor, error: torch.Tensor, clusters: int,
                       ) -> torch.Tensor:
    """Per token (B, n, D): the mean forecast error ``error`` (B, k, D) of the recomputed tokens ``index`` of
    its cluster (0 where a cluster had none)."""
    batch, tokens = assign.shape
    chosen = assign.gather(1, index)  # (B, k)
    sums = torch.zeros(batch, clusters, error.shape[-1], device=error.device, dtype=torch.float32)
    sums.scatter_add_(1, chosen.unsqueeze(-1).expand(-1, -1, error.shape[-1]), error.float())
    counts = torch.zeros(batch, clusters, device=error.device).scatter_add_(1, chosen, torch.ones_like(
        chosen, dtype=torch.float32))
    mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return mean.gather(1, assign.unsqueeze(-1).expand(-1, -1, error.shape[-1]))
