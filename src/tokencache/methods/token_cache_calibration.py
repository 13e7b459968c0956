"""``tc.calibrate``: train a TokenCache predictor on a frozen diffusion transformer, image-free.

1. Trajectories: the frozen model samples from noise (the caller supplies classes or prompts); every step's
   transformer inputs and output and every cacheable module's input and output are recorded.
2. Block sensitivity: for each block alone, the output error when it is pruned at the target ratio on the
   cached steps of the schedule (random tokens); per-block ratios are allocated from it under the budget.
3. Predictor: on cached steps, each partial module's output is relaxed to
   ``w * f(now) + (1 - w) * f(cached at the last full step)`` (other modules return their cache, as at
   inference); loss = MSE of the network output against the uncached output + a budget term driving the
   mean weight of each block to its keep ratio. Only the predictor trains.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.call_settings import guidance_settings
from ..core.layouts import MODULE_KINDS, BlockEntry, find_blocks
from ..core.plan import default_num_tokens
from ..core.schedule import fresh_tokens
from ..core.validation import check_number
from .token_cache import (
    MAX_BUDGET,
    TOKEN_SELECTIONS,
    TPRR,
    VARIANTS,
    TokenCachePredictor,
    allocate_block_ratios,
    token_features,
)

Sampler = Callable[[nn.Module, torch.Generator], None]


@dataclass(frozen=True)
class CalibrationConfig:
    """How :func:`calibrate` samples trajectories and trains the predictor."""

    calls: tuple[dict[str, Any], ...] = ()
    """Keyword arguments of each pipeline call that samples trajectories (for example
    ``{"class_labels": [0, 1, 2, 3]}`` or ``{"prompt": [...]}``); one call = one batch of trajectories."""
    sampler: Sampler | None = None
    """For a bare transformer: ``sampler(transformer, generator)`` runs one sampling run; called
    ``num_runs`` times."""
    num_runs: int = 1
    """Sampling runs with ``sampler`` (pipelines use one run per entry of ``calls``)."""
    num_steps: int = 50
    """Sampling steps the predictor is calibrated for."""
    budget: float = 0.8125
    """Mean fraction of tokens taken from the cache on cached steps, in [0, 0.95]. With the default schedule,
    0.8125 matches ToCa N=4's FLOPs speed-up on the shipped digits DiT (DDIM-50; solved by
    benchmarks/tokencache_ablation.py, and the budget of the shipped predictor)."""
    token_selection: str = "similarity"
    """The ranking recorded as the predictor's default (``calibration["token_selection"]``, which
    ``TokenCacheConfig(predictor)`` uses): ``similarity`` won the ablation on the shipped model (the learned
    ranking did not beat it); ``predictor`` for the learned one, or another ToCa score."""
    schedule: TPRR = field(default_factory=TPRR)
    """Full/cached step schedule the predictor is trained under (and used with by default)."""
    variant: str = "features"
    """``features`` (reads cheap token features) or ``position`` (the paper's g(l, t))."""
    partial_modules: tuple[str, ...] = ("cross_attn", "mlp")
    """Module types recomputed on kept tokens; others are reused whole on cached steps."""
    adaptive_blocks: bool = True
    """Measure block sensitivity and allocate per-block ratios; False prunes every block at ``budget``."""
    iterations: int = 150
    """Optimizer steps."""
    pairs_per_iteration: int = 4
    """(trajectory, cached step) pairs per optimizer step."""
    learning_rate: float = 1e-2
    budget_weight: float = 0.1
    """Weight of the budget term (the output error term is normalised to about 1 at the start)."""
    sensitivity_pairs: int = 16
    """(trajectory, cached step) pairs averaged per block for the sensitivity."""
    hidden: int = 64
    """Width of the predictor's MLP."""
    seed: int = 0
    checkpoint_dir: str | None = None
    """Where to keep a resumable checkpoint (resumes when one with the same settings is there)."""
    checkpoint_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        cls = type(self)
        check_number(cls, "num_steps", self.num_steps, 2, integer=True)
        check_number(cls, "budget", self.budget, 0.0, MAX_BUDGET)
        check_number(cls, "num_runs", self.num_runs, 1, integer=True)
        check_number(cls, "iterations", self.iterations, 0, integer=True)
        check_number(cls, "pairs_per_iteration", self.pairs_per_iteration, 1, integer=True)
        check_number(cls, "learning_rate", self.learning_rate, 0.0, lo_open=True)
        check_number(cls, "budget_weight", self.budget_weight, 0.0)
        check_number(cls, "sensitivity_pairs", self.sensitivity_pairs, 1, integer=True)
        check_number(cls, "hidden", self.hidden, 1, integer=True)
        check_number(cls, "seed", self.seed, 0, integer=True)
        check_number(cls, "checkpoint_every", self.checkpoint_every, 1, integer=True)
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"CalibrationConfig.token_selection must be one of {TOKEN_SELECTIONS}; "
                             f"got {self.token_selection!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"CalibrationConfig.variant must be one of {VARIANTS}; got {self.variant!r}")
        if not isinstance(self.schedule, TPRR):
            raise ValueError(f"CalibrationConfig.schedule must be a TPRR; got {self.schedule!r}")
        if not self.partial_modules or any(k not in MODULE_KINDS for k in self.partial_modules):
            raise ValueError(f"CalibrationConfig.partial_modules must be a non-empty tuple of {MODULE_KINDS}; "
                             f"got {self.partial_modules!r}")
        if not isinstance(self.calls, tuple) or any(not isinstance(c, dict) for c in self.calls):
            raise ValueError("CalibrationConfig.calls must be a tuple of dicts (pipeline keyword arguments)")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed."""
        # token_selection is only recorded (it changes no trained value), so a checkpoint resumes under any
        skip = {"sampler", "checkpoint_dir", "progress", "calls", "iterations", "checkpoint_every", "token_selection"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["schedule"] = dataclasses.asdict(self.schedule)
        out["calls"] = repr(self.calls)
        return out


CHECKPOINT_NAME = "calibration-checkpoint.pt"


class CheckpointMismatchError(ValueError):
    """A checkpoint in ``CalibrationConfig.checkpoint_dir`` was written with other settings; ``differences``
    maps each differing field to (checkpoint value, current value)."""

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]]) -> None:
        self.path, self.differences = path, differences
        details = "; ".join(f"CalibrationConfig.{k}: {a!r} there, {b!r} now" for k, (a, b) in differences.items())
        super().__init__(f"{path} was written with other calibration settings ({details}); give the same settings "
                         "to resume, remove it, or change CalibrationConfig.checkpoint_dir")


def load_checkpoint(config: CalibrationConfig) -> dict[str, Any] | None:
    """The resumable checkpoint of ``config.checkpoint_dir`` (None when there is none); raises
    :class:`CheckpointMismatchError` when it was written with other settings, before any sampling."""
    if not config.checkpoint_dir:
        return None
    path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=False)
        previous = state["fingerprint"]
        if not isinstance(previous, dict):
            raise TypeError(f"its fingerprint is a {type(previous).__name__}, not a mapping")
    except Exception as error:  # a truncated or foreign file: say which, rather than a pickle traceback
        raise ValueError(f"{path} cannot be read as a calibration checkpoint ({error}); remove it to start "
                         "afresh") from error
    current = config.fingerprint()
    if previous != current:
        keys = [*current, *(k for k in previous if k not in current)]
        differences = {k: (previous.get(k), current.get(k)) for k in keys if previous.get(k) != current.get(k)}
        raise CheckpointMismatchError(path, differences)
    return state


@dataclass
class StepRecord:
    args: tuple
    kwargs: dict[str, Any]
    output: torch.Tensor
    module_inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    module_outputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def _first_tensor(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record_trajectories(transformer: nn.Module, blocks: list[BlockEntry], run: Callable[[int], None],
                        num_runs: int, num_steps: int) -> list[list[StepRecord]]:
    """Run ``run(i)`` for each trajectory batch and record every transformer call and module in/output."""
    runs: list[list[StepRecord]] = []
    current: list[StepRecord] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        current.append(StepRecord(_detach(args), _detach(kwargs), torch.empty(0)))

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current[-1].output = _first_tensor(output).detach().clone()

    handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
               transformer.register_forward_hook(post, with_kwargs=True)]
    for block in blocks:
        for slot, module in block.slots():
            key = (block.index, slot.name)

            def slot_hook(m: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, key=key) -> None:
                tokens = args[0] if args else kwargs["hidden_states"]
                current[-1].module_inputs[key] = tokens.detach().clone()
                current[-1].module_outputs[key] = output.detach().clone()

            handles.append(module.register_forward_hook(slot_hook, with_kwargs=True))
    with _hooks(handles), torch.no_grad():
        for i in range(num_runs):
            current = []
            run(i)
            if len(current) != num_steps:
                raise RuntimeError(f"calibration run {i} called the transformer {len(current)} times for "
                                   f"{num_steps} steps; calibrate needs one (CFG-batched) call per step")
            runs.append(current)
            if i == 0 and num_runs > 1:
                _check_room_for_runs(_record_bytes(current), num_runs)
    return runs


def _record_bytes(records: list[StepRecord]) -> int:
    tensors = [t for r in records for t in (r.output, *r.module_inputs.values(), *r.module_outputs.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_room_for_runs(first_run_bytes: int, num_runs: int) -> None:
    """Fail after the first recorded run, not when the machine runs out of memory: every run records as much
    as the first, and all of them are kept for training."""
    available = _available_memory_bytes()
    needed = first_run_bytes * (num_runs - 1)
    if available is not None and needed > 0.9 * available:
        raise MemoryError(
            f"calibration records {first_run_bytes / 2**30:.1f} GiB per run (every cacheable module's input and "
            f"output at every step); the other {num_runs - 1} runs need {needed / 2**30:.1f} GiB more and "
            f"{available / 2**30:.1f} GiB are available: use fewer runs or fewer samples per run "
            f"(CalibrationConfig.calls; `tokencache calibrate --runs R --per-call P`)")


class _Relaxation:
    """Forward hooks that replace module outputs on a cached step: partial modules mix fresh and cached
    outputs with weights from ``weight_fn``; the others return their cache."""

    def __init__(self, blocks: list[BlockEntry], partial: set[str]) -> None:
        self.blocks = blocks
        self.partial = partial
        self.cache: StepRecord | None = None
        self.weight_fn: Callable[[int, tuple[int, str], torch.Tensor, torch.Tensor], torch.Tensor | None] | None
        self.weight_fn = None
        self.only_block: int | None = None
        self.weights: dict[int, list[torch.Tensor]] = {}

    @contextmanager
    def attached(self) -> Iterator[_Relaxation]:
        handles = []
        for block in self.blocks:
            for slot, module in block.slots():
                handles.append(module.register_forward_hook(self._hook(block.index, slot.name, slot.kind),
                                                            with_kwargs=True))
        with _hooks(handles):
            yield self

    def _hook(self, block: int, name: str, kind: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            if self.cache is None or (self.only_block is not None and block != self.only_block):
                return output
            cached = self.cache.module_outputs[(block, name)]
            if kind not in self.partial:
                return cached
            tokens = args[0] if args else kwargs["hidden_states"]
            w = self.weight_fn(block, (block, name), tokens, self.cache.module_inputs[(block, name)])
            self.weights.setdefault(block, []).append(w)
            return w.unsqueeze(-1) * output + (1 - w.unsqueeze(-1)) * cached

        return hook


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((output - reference) ** 2).mean() / (reference**2).mean().clamp_min(1e-12)


def _cached_pairs(runs: list[list[StepRecord]], full: tuple[bool, ...]) -> list[tuple[int, int, int]]:
    """(run, cached step, its last full step) for every cached step of every run."""
    pairs = []
    for r in range(len(runs)):
        last_full = 0
        for step, is_full in enumerate(full):
            if is_full:
                last_full = step
            else:
                pairs.append((r, step, last_full))
    return pairs


def _forward(transformer: nn.Module, record: StepRecord) -> torch.Tensor:
    return _first_tensor(transformer(*record.args, **record.kwargs))


def measure_block_sensitivity(transformer: nn.Module, blocks: list[BlockEntry], runs: list[list[StepRecord]],
                              pairs: list[tuple[int, int, int]], budget: float, partial: set[str],
                              generator: torch.Generator) -> list[float]:
    """Relative output error when one block alone is pruned at ``budget`` (random tokens) on cached steps."""
    relax = _Relaxation(blocks, partial)
    errors = []
    with relax.attached(), torch.no_grad():
        for block in blocks:
            relax.only_block = block.index
            total = 0.0
            for r, step, last_full in pairs:
                relax.cache = runs[r][last_full]

                def hard_random(b: int, key: tuple[int, str], tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
                    batch, n = tokens.shape[:2]
                    keep = fresh_tokens(1.0 - budget, n)
                    order = torch.rand(batch, n, generator=generator).argsort(dim=-1)[:, :keep]
                    return torch.zeros(batch, n).scatter_(1, order, 1.0).to(tokens)

                relax.weight_fn = hard_random
                record = runs[r][step]
                total += float(_relative_error(_forward(transformer, record), record.output))
            errors.append(total / len(pairs))
    return errors


def calibrate(target: Any, config: CalibrationConfig) -> TokenCachePredictor:
    """Calibrate a :class:`TokenCachePredictor` for ``target`` (a diffusers pipeline, or a transformer with
    ``config.sampler``). The transformer's weights are not changed."""
    if not isinstance(config, CalibrationConfig):
        raise TypeError(f"config must be a CalibrationConfig; got {type(config).__name__}")
    if isinstance(target, nn.Module):
        transformer, pipeline = target, None
        if config.sampler is None:
            raise ValueError("CalibrationConfig.sampler is required to calibrate a bare transformer")
    else:
        transformer, pipeline = getattr(target, "transformer", None), target
        if not isinstance(transformer, nn.Module):
            raise TypeError(f"target must be a diffusers pipeline or a transformer; got {type(target).__name__}")
        if not config.calls:
            raise ValueError("CalibrationConfig.calls must list at least one pipeline call (classes or prompts)")
    blocks = find_blocks(transformer)
    num_tokens = default_num_tokens(transformer)
    state = load_checkpoint(config)  # a settings mismatch fails here, before any sampling
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    def run(i: int) -> None:
        g = torch.Generator(device=transformer.device).manual_seed(config.seed + 1000 + i)
        if pipeline is not None:
            pipeline(**config.calls[i], num_inference_steps=config.num_steps, generator=g)
        else:
            config.sampler(transformer, g)

    num_runs = len(config.calls) if pipeline is not None else config.num_runs
    was_training = transformer.training
    requires_grad = {name: p.requires_grad for name, p in transformer.named_parameters()}
    transformer.eval().requires_grad_(False)
    try:
        runs = record_trajectories(transformer, blocks, run, num_runs, config.num_steps)
        full = config.schedule.full_steps(config.num_steps)
        pairs = _cached_pairs(runs, full)
        if not pairs:
            raise ValueError("CalibrationConfig.schedule has no cached step; nothing to calibrate")
        partial = set(config.partial_modules)
        predictor, sensitivity, history = _train(transformer, blocks, runs, pairs, partial, num_tokens, config,
                                                 generator, state)
    finally:
        for name, p in transformer.named_parameters():
            p.requires_grad_(requires_grad[name])
        transformer.train(was_training)
    predictor.calibration.update(block_sensitivity=sensitivity, **history)
    if pipeline is not None:  # what the trajectories were sampled with; a bare transformer's sampler is opaque
        settings = [guidance_settings(pipeline, call) for call in config.calls]
        predictor.calibration["sampler_settings"] = [s for i, s in enumerate(settings) if s not in settings[:i]]
    return predictor.eval()


def _train(transformer: nn.Module, blocks: list[BlockEntry], runs: list[list[StepRecord]],
           pairs: list[tuple[int, int, int]], partial: set[str], num_tokens: int, config: CalibrationConfig,
           generator: torch.Generator, state: dict[str, Any] | None
           ) -> tuple[TokenCachePredictor, list[float], dict[str, Any]]:
    checkpoint = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None

    rng = random.Random(config.seed)
    # With several runs the last one is held out to score the trained predictor.
    holdout = [p for p in pairs if p[0] == len(runs) - 1] if len(runs) > 1 else pairs
    pairs = [p for p in pairs if p[0] != len(runs) - 1] if len(runs) > 1 else pairs
    holdout = rng.sample(holdout, min(config.sensitivity_pairs, len(holdout)))
    sensitivity_pairs = rng.sample(pairs, min(config.sensitivity_pairs, len(pairs)))
    if state is not None:
        sensitivity = state["sensitivity"]
    elif config.adaptive_blocks:
        sensitivity = measure_block_sensitivity(transformer, blocks, runs, sensitivity_pairs, config.budget, partial,
                                                generator)
    else:
        sensitivity = [1.0] * len(blocks)
    ratios = allocate_block_ratios(sensitivity, config.budget)
    keep = torch.tensor([1.0 - r for r in ratios])

    model_info = dict(class_name=type(transformer).__name__, num_blocks=len(blocks), num_tokens=num_tokens,
                      num_steps=config.num_steps)
    calibration = dict(budget=config.budget, schedule=dataclasses.asdict(config.schedule),
                       adaptive_blocks=config.adaptive_blocks, partial_modules=list(config.partial_modules),
                       token_selection=config.token_selection)
    predictor = TokenCachePredictor(len(blocks), num_tokens, config.num_steps, config.variant, config.hidden,
                                    model_info, calibration)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=config.learning_rate)
    start, losses = 0, []
    if state is not None:
        predictor.load_state_dict(state["predictor"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["iteration"], state["losses"]
        rng.setstate(state["rng"])

    relax = _Relaxation(blocks, partial)

    def soft_weights(step: int) -> Callable:
        def weight(block: int, key: tuple[int, str], tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
            batch, n = tokens.shape[:2]
            features = token_features(tokens, last) if predictor.variant == "features" else None
            logits = predictor.logits(torch.full((batch,), block), torch.full((batch,), step), features)
            # Centre the sigmoid on the k-th largest logit (a soft top-k): the weights start near the block's
            # keep ratio, so the output error shapes the ranking instead of fighting the budget term. The threshold
            # is not detached: detaching it biased the gradient (raising every logit looked like raising every
            # weight) and training then increased the objective it was minimising.
            k = max(1, fresh_tokens(float(keep[block]), n))
            threshold = logits.topk(k, dim=-1).values[:, -1:]
            return torch.sigmoid(logits - threshold)

        return weight

    def hard_weights(step: int, selection: str) -> Callable:
        def weight(block: int, key: tuple[int, str], tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
            batch, n = tokens.shape[:2]
            k = fresh_tokens(float(keep[block]), n)
            if selection == "random":
                score = torch.rand(batch, n, generator=generator)
            else:
                features = token_features(tokens, last) if predictor.variant == "features" else None
                score = predictor.logits(torch.full((batch,), block), torch.full((batch,), step), features)
            index = score.topk(k, dim=-1).indices
            return torch.zeros(batch, n).scatter_(1, index, 1.0).to(tokens)

        return weight

    def holdout_error(selection: str) -> float:
        total = 0.0
        with torch.no_grad():
            for r, step, last_full in holdout:
                relax.cache, relax.weight_fn = runs[r][last_full], hard_weights(step, selection)
                record = runs[r][step]
                total += float(_relative_error(_forward(transformer, record), record.output))
        return total / len(holdout)

    def relaxed_loss(pair: tuple[int, int, int], error_scale: float) -> torch.Tensor:
        r, step, last_full = pair
        relax.cache, relax.weight_fn, relax.weights = runs[r][last_full], soft_weights(step), {}
        record = runs[r][step]
        error = _relative_error(_forward(transformer, record), record.output)
        mean_w = torch.stack([torch.cat([w.mean().reshape(1) for w in relax.weights[b]]).mean()
                              for b in sorted(relax.weights)])
        budget = ((mean_w - keep[sorted(relax.weights)]) ** 2).sum()
        return error / error_scale + config.budget_weight * budget

    def objective(error_scale: float) -> float:
        """The training loss on fixed pairs, so that before and after are comparable."""
        with torch.no_grad():
            return sum(float(relaxed_loss(p, error_scale)) for p in sensitivity_pairs) / len(sensitivity_pairs)

    with relax.attached():
        # The output error is divided by the untrained predictor's, so the budget weight is scale-free. A resumed
        # run reuses the first run's scale and objective: the loaded predictor is no longer the untrained one.
        error_before = state["error_before"] if state is not None else holdout_error("predictor")
        error_scale = max(error_before, 1e-12)
        objective_before = state["objective_before"] if state is not None else objective(error_scale)
        progress = tqdm(range(start, config.iterations), desc="calibrate", disable=not config.progress,
                        initial=start, total=config.iterations)
        for iteration in progress:
            optimizer.zero_grad()
            total_loss = 0.0
            for pair in rng.sample(pairs, min(config.pairs_per_iteration, len(pairs))):
                loss = relaxed_loss(pair, error_scale) / config.pairs_per_iteration
                loss.backward()
                total_loss += float(loss.detach())
            optimizer.step()
            losses.append(total_loss)
            progress.set_postfix(loss=f"{total_loss:.4f}")
            if checkpoint and ((iteration + 1) % config.checkpoint_every == 0 or iteration + 1 == config.iterations):
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                tmp = checkpoint.with_suffix(".tmp")
                torch.save(dict(fingerprint=config.fingerprint(), sensitivity=sensitivity,
                                predictor=predictor.state_dict(), optimizer=optimizer.state_dict(),
                                iteration=iteration + 1, losses=losses, rng=rng.getstate(),
                                error_before=error_before, objective_before=objective_before), tmp)
                tmp.replace(checkpoint)
        objective_after = objective(error_scale)
        relax.cache = None
        error_after = holdout_error("predictor")
        error_random = holdout_error("random")
    history = dict(block_ratios=ratios, iterations=config.iterations, losses=[round(x, 6) for x in losses],
                   objective_before=objective_before, objective_after=objective_after,
                   holdout_error_untrained=error_before,
                   holdout_error_trained=error_after, holdout_error_random=error_random)
    return predictor, sensitivity, history


def class_calls(num_classes: int, per_call: int, num_calls: int, seed: int = 0,
                **extra: Any) -> tuple[dict[str, Any], ...]:
    """Pipeline calls with random class labels, for class-conditional models."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_calls, per_call), generator=g)
    return tuple(dict(class_labels=row.tolist(), **extra) for row in labels)
