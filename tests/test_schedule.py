"""The `auto` pruning moment: the paper's weight-distance rule with steps in place of epochs."""

import pytest
import torch

from earlycrop.schedule import WeightDistanceRule


def _weights_at(distances: list[float]) -> list[list[torch.Tensor]]:
    """Weight snapshots whose relative distance to the first snapshot follows `distances`."""
    w1 = torch.ones(100)
    return [[w1 * (1 + d)] for d in distances]


def observe_all(rule: WeightDistanceRule, snapshots) -> int | None:
    for e, weights in enumerate(snapshots, start=1):
        if rule.observe(e * rule.interval, weights):
            return e
    return None


def test_fires_once_the_distance_stops_moving():
    # d: 0, 0.5, 0.8, 0.9, 0.92 ...; tau = d_2 * (1 - 0.5 - 0.1) = 0.2
    rule = WeightDistanceRule(interval=10, cap=1000, sparsity=0.5)
    fired = observe_all(rule, _weights_at([0.0, 0.5, 0.8, 0.9, 0.92, 0.93]))
    assert fired == 4  # |0.9 - 0.8| = 0.1 < 0.2, while |0.8 - 0.5| = 0.3 is not
    assert rule.threshold == pytest.approx(0.2)
    assert [round(d, 6) for _, d in rule.trace] == [0.0, 0.5, 0.8, 0.9]


def test_never_before_the_third_interval():
    rule = WeightDistanceRule(interval=5, cap=1000, sparsity=0.5)
    assert observe_all(rule, _weights_at([0.0, 0.5, 0.5, 0.5])) == 3


def test_high_sparsity_makes_tau_non_positive_so_only_the_cap_fires():
    rule = WeightDistanceRule(interval=1, cap=6, sparsity=0.95)
    assert observe_all(rule, _weights_at([0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])) == 6


def test_steps_between_intervals_are_ignored():
    rule = WeightDistanceRule(interval=10, cap=100, sparsity=0.5)
    assert not rule.observe(3, [torch.ones(3)]) and rule.trace == []


@pytest.mark.parametrize("kwargs", [dict(interval=0, cap=5, sparsity=0.5), dict(interval=1, cap=5, sparsity=1.0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        WeightDistanceRule(**kwargs)
