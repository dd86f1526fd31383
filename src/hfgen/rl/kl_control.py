"""KL-penalty coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019, sec. 2.2).

Both carry their state in `state_dict`/`load_state_dict`, so `accelerator.register_for_checkpointing` saves
and restores them with the rest of a PPO checkpoint.
"""

from __future__ import annotations


class FixedKLController:
    """A constant coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    Raises beta when the policy drifts further from the reference than `target` nats per sequence and
    lowers it when closer; `horizon` (in episodes) sets how fast: over `horizon` episodes at most a factor
    of about e^0.2. `n_steps` is the number of episodes since the last update (the global rollout batch).
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
