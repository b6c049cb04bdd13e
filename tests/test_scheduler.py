"""The anytime server's scheduler without HTTP, on an injected clock that the model's steps advance by known times:
its deadline logic is checked exactly (which requests run, to which step, which are answered at once as misses)."""

import math

import pytest
import torch

from cascadenet.deployment.server import DeadlineError, Scheduler, StepTimes
from cascadenet.evaluation.early_exit import predict
from cascadenet.models.cascade import CascadeConfig

# seconds per example of each step: step 0 (input-independent) costs nothing
PER_EXAMPLE = [0.0, 0.001, 0.002, 0.002, 0.002, 0.002]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TimedRun:
    """A model's anytime run whose every step advances the clock by ``factor x PER_EXAMPLE[step] x rows``."""

    def __init__(self, run, clock: Clock, factor: float) -> None:
        self.run, self.clock, self.factor = run, clock, factor

    def __iter__(self):
        return self

    def __next__(self):
        s = next(self.run)
        self.clock.t += self.factor * PER_EXAMPLE[s.step] * s.logits.shape[0]
        return s

    def __getattr__(self, name):
        return getattr(self.run, name)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = CascadeConfig(arch="resnet10", width=4, in_channels=1, num_classes=10).build().eval()
    assert model.num_steps == len(PER_EXAMPLE) and model.first_informative_exit == 1
    clock = Clock()
    factor = [1.0]
    anytime = model.anytime
    model.anytime = lambda x, **kw: TimedRun(anytime(x, **kw), clock, factor[0])
    x = torch.randn(8, 1, 16, 16)
    # the table the scheduler believes: exact at sizes 1 and 8 and linear in between (as the steps above are)
    times = StepTimes([1, 8], [[t, 8 * t] for t in PER_EXAMPLE])

    def scheduler(**kw):
        options = {"step_times": times, "clock": clock, "start": False, "margin": 0.0, "safety": 1.0,
                   "round_share": 1.0} | kw  # fmt: skip
        return Scheduler(model, **options)

    return model, clock, factor, x, scheduler, anytime


def test_step_times_interpolate_and_extrapolate():
    times = StepTimes([2, 4, 8], [[0.0, 0.0, 0.0], [0.002, 0.003, 0.007]])
    assert times.step(1, 1) == 0.002 and times.step(1, 2) == 0.002  # below the smallest: its time
    assert times.step(1, 3) == pytest.approx(0.0025)
    assert times.step(1, 6) == pytest.approx(0.005)
    assert times.step(1, 16) == pytest.approx(0.015)  # along the last two: 1 ms per example
    assert times.cumulative(6) == pytest.approx([0.0, 0.005])
    times.observe(0.010, 0.020)  # twice as slow as estimated: the ratio rises half way at once
    assert times.ratio == pytest.approx(1.5)
    assert times.cumulative(6) == pytest.approx([0.0, 0.0075])
    times.observe(0.010, 0.010)  # back to normal: it falls slowly
    assert times.ratio == pytest.approx(1.45)
    with pytest.raises(ValueError, match="increasing"):
        StepTimes([4, 2], [[0.0, 0.0]])


def test_a_round_runs_the_steps_that_fit_before_its_earliest_deadline_and_sheds_the_hopeless(setup):
    model, clock, _, x, make, _ = setup
    s = make()
    clock.t = 5.0
    late = s.submit(x[0], 0.012)  # 12 ms: two requests to step 3 take 2 x (1 + 2 + 2) = 10 ms, step 4 14 ms
    easy = s.submit(x[1], 0.050)
    hopeless = s.submit(x[2], 0.002)  # the first exit of a batch of 3 takes 3 ms: answered at once
    assert s.run_round() == 3
    with pytest.raises(DeadlineError, match="cannot be met"):
        hopeless.result(timeout=0)
    assert clock.t == pytest.approx(5.010)
    expected = predict(model, x[:2], budget=model.exit_costs((1, 16, 16)).macs[3])
    for i, f in enumerate([late, easy]):
        a = f.result(timeout=0)
        assert a["exit"] == 3 and a["batch"] == 2
        assert a["label"] == int(expected.predictions[i])
        assert a["probability"] == pytest.approx(float(expected.confidence[i]), abs=1e-6)
        assert a["ms"] == pytest.approx(10.0) and a["deadline_met"]
    assert s.counts == {"rounds": 1, "answered": 2, "missed": 1, "shed": 1}


def test_time_already_spent_waiting_counts_and_rounds_are_capped_by_round_share(setup):
    _, clock, _, x, make, _ = setup
    s = make(round_share=0.3)
    clock.t = 1.0
    # arrived 20 ms ago with 40 ms: 20 ms left, but a round may take 0.3 x 40 = 12 ms: step 3 (10 ms at batch 2)
    a = s.submit(x[0], 0.040, arrival=0.980)
    b = s.submit(x[1], 0.100)
    s.run_round()
    assert [f.result(timeout=0)["exit"] for f in (a, b)] == [3, 3]
    assert a.result(timeout=0)["ms"] == pytest.approx(30.0)
    s = make(round_share=1.0)
    a = s.submit(x[0], 0.040, arrival=clock.t - 0.021)  # 19 ms left: step 5 (18 ms at batch 2) fits
    b = s.submit(x[1], 0.100)
    s.run_round()
    assert [f.result(timeout=0)["exit"] for f in (a, b)] == [5, 5]
    a = s.submit(x[0], 0.008)
    s.run_round()
    assert a.result(timeout=0)["exit"] == 4  # alone: 1 + 2 + 2 + 2 = 7 ms to step 4, 9 ms to step 5
    assert s.counts["missed"] == 0


def test_a_lone_request_too_late_for_any_step_gets_the_first_exit_and_counts_as_a_miss(setup):
    model, clock, _, x, make, _ = setup
    s = make()
    f = s.submit(x[0], 0.0005)
    s.run_round()
    a = f.result(timeout=0)
    assert a["exit"] == model.first_informative_exit and not a["deadline_met"] and a["ms"] == pytest.approx(1.0)
    assert s.counts == {"rounds": 1, "answered": 1, "missed": 1, "shed": 0}


def test_a_round_running_slower_than_planned_stops_early_and_raises_the_estimates(setup):
    _, clock, factor, x, make, _ = setup
    s = make()
    factor[0] = 2.0  # the machine is now twice as slow as the table says
    f = s.submit(x[0], 0.0065)  # planned: 1 + 2 + 2 = 5 ms to step 3 fits, 7 ms to step 4 does not
    s.run_round()
    # step 1 took 2 ms, step 2 4 ms: at 6 ms the 2 ms of step 3 would end past 6.5 ms, so it stops at step 2
    a = f.result(timeout=0)
    assert a["exit"] == 2 and a["deadline_met"] and a["ms"] == pytest.approx(6.0)
    assert s.step_times.ratio == pytest.approx(1.5)  # 6 ms for an estimated 3 ms: half way up at once
    f = s.submit(x[0], 0.0065)  # now planned: 1.5 x 3 = 4.5 ms to step 2 fits, 1.5 x 5 = 7.5 ms to step 3 does not
    s.run_round()
    a = f.result(timeout=0)
    assert a["exit"] == 2 and a["deadline_met"] and a["ms"] == pytest.approx(6.0)
    assert s.counts == {"rounds": 2, "answered": 2, "missed": 0, "shed": 0}


def test_final_mode_runs_every_request_to_the_last_step_whatever_its_deadline(setup):
    model, clock, _, x, make, _ = setup
    s = make(mode="final", step_times=None)
    futures = [s.submit(x[i], 0.001) for i in range(3)]
    s.run_round()
    answers = [f.result(timeout=0) for f in futures]
    assert [a["exit"] for a in answers] == [model.num_steps - 1] * 3
    assert not any(a["deadline_met"] for a in answers)
    assert s.counts == {"rounds": 1, "answered": 3, "missed": 3, "shed": 0}


def test_step_times_are_measured_at_powers_of_two_up_to_max_batch(setup):
    model, _, _, x, _, anytime = setup
    model.anytime = anytime  # real time
    # longest=inf: every size is measured however slow the machine (a loaded one stops early, as it should)
    times = StepTimes.measure(model, x[0], 5, repeats=1, longest=math.inf)
    assert times.sizes == [1, 2, 4, 5] and times.num_steps == model.num_steps
    assert all(t >= 0 for row in times.times for t in row)
    assert StepTimes.measure(model, x[0], 5, repeats=1, longest=0.0).sizes == [1]  # the first run is past 0 s
    sizes = Scheduler(model, max_batch=3, example=x[0], start=False).step_times.sizes
    assert sizes and sizes == [1, 2, 3][: len(sizes)]  # up to max_batch, or fewer where a run took 1 s


def test_bad_settings_are_refused(setup):
    *_, make, _ = setup
    for share in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--round-share must be in"):
            make(round_share=share)
    with pytest.raises(ValueError, match="unknown mode"):
        make(mode="fast")


def test_measured_stalls_are_removed_from_the_step_times():
    from cascadenet.deployment.server import _plausible

    # a stall at batch 2 and at batch 16: at most proportional to the batch, never less than a smaller batch's
    assert _plausible([1, 2, 4, 8, 16], [1.0, 250.0, 3.0, 4.0, 160.0]) == [1.0, 2.0, 3.0, 4.0, 8.0]
    assert _plausible([1, 2, 4], [9.0, 2.0, 3.0]) == [2.0, 2.0, 3.0]  # a stall at the smallest size
