"""Token selection made for forecasting: the forecast_error and forecast_term scores, and the cluster correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokencache as tc
from tokencache.core.forecast import (
    TokenForecaster,
    cluster_correction,
    kmeans,
    last_term_size,
    spread_over_clusters,
)
from tokencache.core.state import SlotState

from models import tiny_dit_pipeline
from test_equivalence import cached_run_and_plan, dit_pipe_run

F = tc.ForecastConfig


def test_forecast_scores_need_forecasting_and_cluster_fields_are_checked():
    with pytest.raises(ValueError, match="ToCaConfig.score"):
        tc.ToCaConfig(score="forecast_term")
    with pytest.raises(ValueError, match="ToCaConfig.score"):
        tc.ToCaConfig(score="forecast_error", forecast=F(order=0))
    with pytest.raises(ValueError, match="ForecastConfig.clusters"):
        F(order=2, clusters=-1)
    with pytest.raises(ValueError, match="ForecastConfig.cluster_weight"):
        F(order=2, clusters=4, cluster_weight=1.5)


def test_kmeans_separates_groups_and_selection_visits_every_cluster_first():
    torch.manual_seed(0)
    groups = torch.cat([torch.randn(1, 6, 3) * 0.01, 5 + torch.randn(1, 6, 3) * 0.01], dim=1)
    assign = kmeans(groups, 2)
    assert len(set(assign[0, :6].tolist())) == 1 and len(set(assign[0, 6:].tolist())) == 1
    assert assign[0, 0] != assign[0, 6]
    assert torch.equal(assign, kmeans(groups, 2))  # deterministic
    score = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    chosen = spread_over_clusters(score, assign, 2, 2)
    assert sorted(chosen[0].tolist()) == [0, 11]  # the best of each cluster, not the two best overall
    chosen = spread_over_clusters(score, assign, 4, 2)
    assert sorted(chosen[0].tolist()) == [0, 1, 10, 11]


def test_cluster_correction_is_the_mean_error_of_each_clusters_recomputed_tokens():
    assign = torch.tensor([[0, 0, 1, 1, 1]])
    index = torch.tensor([[0, 2, 3]])
    error = torch.tensor([[[2.0], [1.0], [3.0]]])
    shift = cluster_correction(assign, index, error, 2)
    assert shift[0, :, 0].tolist() == [2.0, 2.0, 2.0, 2.0, 2.0]
    shift = cluster_correction(torch.tensor([[0, 1]]), torch.tensor([[0]]), torch.tensor([[[4.0]]]), 2)
    assert shift[0, :, 0].tolist() == [4.0, 0.0]  # a cluster without recomputed tokens gets no shift


def test_last_term_size_is_the_highest_known_term_relative_to_the_value():
    forecaster = TokenForecaster(F(order=2, expansion="newton"))
    state = SlotState()
    value = torch.ones(1, 2, 4)
    forecaster.update_all(state, value, 0.0)
    state.output = value
    forecaster.update_all(state, value * torch.tensor([[[1.0]], [[3.0]]]).view(1, 2, 1), 2.0)
    state.output = value * torch.tensor([1.0, 3.0]).view(1, 2, 1)
    size = last_term_size(forecaster, state, 3.0)
    # token 0 did not change (first difference 0); token 1 rose by 2 over 2 steps: slope 1, one step ahead
    assert size[0, 0] == 0 and size[0, 1] == pytest.approx(1.0 / 3.0)


@pytest.mark.parametrize("config", [
    tc.ToCaConfig(score="forecast_error", fresh_ratio=0.3, forecast=F(order=2, expansion="newton")),
    tc.ToCaConfig(score="forecast_term", fresh_ratio=0.3, forecast=F(order=2, expansion="newton")),
    tc.ToCaConfig(score="random", fresh_ratio=0.3, forecast=F(order=2, expansion="newton", clusters=3)),
    tc.ToCaConfig(score="forecast_term", fresh_ratio=0.3, cfg_shared_selection=True,
                  forecast=F(order=1, clusters=2, cluster_weight=0.5)),
])
def test_forecast_selections_run_repeat_and_equal_their_plan(config):
    pipe = tiny_dit_pipeline()
    stats, plan = cached_run_and_plan(pipe, config, steps=9)
    assert stats.flops == plan.flops and stats.forecast_flops == plan.forecast_flops > 0
    assert stats.step_kinds.count("partial") > 0
    handle = tc.apply(pipe, config)
    first = dit_pipe_run(pipe, steps=9)
    again = dit_pipe_run(pipe, steps=9)
    handle.remove()
    assert np.isfinite(first).all() and (first == again).all()


def test_forecast_term_picks_other_tokens_than_random():
    pipe = tiny_dit_pipeline()
    outputs = {}
    for score in ("random", "forecast_term"):
        config = tc.ToCaConfig(score=score, fresh_ratio=0.3, frequency_weight=0.0, forecast=F(order=1))
        handle = tc.apply(pipe, config)
        outputs[score] = dit_pipe_run(pipe, steps=9)
        handle.remove()
    assert not np.array_equal(outputs["random"], outputs["forecast_term"])
