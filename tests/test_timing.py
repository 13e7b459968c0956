"""Issue 13, item 9: speed-ups from process CPU time with their spread over rounds, flagged when the rounds
disagree. Tested with injected fake clocks, never by timing anything."""

import json

import pytest

from tokencache.core.timing import TOLERANCE, Clocks, Timing, speedup_spread, timed, timing_problems
from tokencache.demo import runner
from tokencache.demo.compare import Method, compare, format_table
from tokencache.methods.fora import FORAConfig


class Scripted:
    """A clock whose every timed interval lasts the next of ``durations`` (read at start, then at end)."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now = 0.0
        self.running = False

    def __call__(self) -> float:
        if self.running:
            self.now += self.durations.pop(0)
        self.running = not self.running
        return self.now


def fake_clocks(cpu, wall=None) -> Clocks:
    return Clocks(wall=Scripted(wall or [1.0] * len(cpu)), cpu=Scripted(cpu))


def test_timed_reads_both_injected_clocks():
    clocks = fake_clocks(cpu=[2.0], wall=[30.0])
    result, timing = timed(lambda: "done", clocks)
    assert result == "done" and timing == Timing(wall=30.0, cpu=2.0)


def test_speedup_spread_and_problems():
    pairs = [(Timing(1, 10), Timing(1, 4)), (Timing(1, 10), Timing(1, 8))]
    cpu = speedup_spread(pairs)
    assert (cpu.low, cpu.high, cpu.median, cpu.rounds) == (1.25, 2.5, 1.875, 2)
    assert not cpu.consistent and cpu.text() == "1.88x (1.25-2.50)"
    assert "rounds disagree" in timing_problems("ToCa", cpu, uncached=False)[0]
    steady = speedup_spread([(Timing(1, 10), Timing(1, 4)), (Timing(1, 10), Timing(1, 4.1))])
    assert steady.consistent and timing_problems("ToCa", steady, uncached=False) == []
    # the uncached run against itself must come out near 1x, even when the rounds agree with each other
    off = speedup_spread([(Timing(1, 10), Timing(1, 15))] * 2)
    assert off.consistent and "not 1x" in timing_problems("no cache", off, uncached=True)[0]
    assert speedup_spread([(Timing(8, 1), Timing(1, 1))], clock="wall").median == 8
    with pytest.raises(ValueError, match="clock"):
        speedup_spread(pairs, clock="gpu")


def _two_methods(quick, ddpm):
    return [Method("no cache (DDIM-4)", "no cache", steps=4),
            Method("FORA N=3", "FORA", steps=4, config=FORAConfig(interval=3))]


@pytest.mark.parametrize("busy", [True, False])
def test_demo_reports_cpu_time_with_range_and_flags_disagreeing_rounds(busy, tmp_path, monkeypatch, capsys):
    """A busy machine as the issue saw it: the wall clock says 14.7x, the CPU-time rounds disagree."""
    monkeypatch.setattr(runner, "demo_methods", _two_methods)
    # 4-step runs instead of 50 (the clocks are fake anyway)
    monkeypatch.setattr(runner, "compare", lambda *a, **k: compare(*a, reference_steps={"ddim": 4}, **k))
    # timed calls: the warm-up, then per round the uncached reference, the no-cache row, FORA
    fora_second_round = 8.0 if busy else 4.1
    cpu = [1.0, 10.0, 10.0, 4.0, 10.0, 10.0, fora_second_round]
    wall = [1.0, 44.1, 30.0, 3.0, 30.0, 45.5, 3.1]  # wall-clock rounds taken while other processes run
    runner.run_demo(tmp_path, samples=10, repeats=2, ddpm=False, clocks=fake_clocks(cpu, wall))
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    fora = results["records"][1]
    assert fora["cpu_speedup"] == pytest.approx((2.5 + 10 / fora_second_round) / 2)
    assert fora["cpu_speedup_range"] == pytest.approx([10 / fora_second_round, 2.5])
    assert fora["measured_speedup"] == pytest.approx((44.1 / 3.0 + 30 / 3.1) / 2)  # the wall clock, kept too
    assert "CPU time" in out and ("(2.44-2.50)" in out or busy)
    assert results["meta"]["timing_unreliable"] is busy
    if busy:
        assert "WARNING" in out and "FORA N=3: rounds disagree" in out and "1.88x (1.25-2.50) !" in out
        assert results["meta"]["timing_warnings"] == fora["timing_warnings"]
    else:
        assert "WARNING" not in out and fora["timing_warnings"] == []


def test_table_falls_back_to_wall_clock_for_old_records():
    record = dict(method="m", sampler="ddim", steps=50, flops_speedup=2.0, measured_speedup=1.5, psnr=30.0,
                  ssim=0.9, fd=1.0, accuracy=1.0)
    assert "| 1.50x |" in format_table([record])
    assert TOLERANCE == 0.15
