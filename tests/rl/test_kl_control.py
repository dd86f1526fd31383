"""KL coefficient controllers: fixed stays put, adaptive moves toward the target by Ziegler et al.'s rule."""

import pytest

from hfgen.rl.kl_control import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_changes():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


def test_adaptive_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2: x (1 + 0.2 * 100 / 10000)
    assert controller.value == pytest.approx(0.1 * 1.002)
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=100)  # error +0.1
    assert controller.value == pytest.approx(0.1 * 1.001)
    controller.update(current_kl=0.0, n_steps=100)  # error clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 1.001 * 0.998)


def test_adaptive_controller_state_round_trips_for_checkpoints():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(current_kl=20.0, n_steps=50)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value == pytest.approx(0.11)


def test_adaptive_controller_rejects_a_non_positive_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
