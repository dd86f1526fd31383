"""SimPO (Meng et al. 2024) on TRL's experimental `CPOTrainer` with `loss_type: simpo`: the implicit reward is the
length-normalised log-probability beta x mean log pi(y|x), with a target margin `simpo_gamma`; no reference model.

    hfgen train recipes/tiny/simpo.yaml

Keys are TRL's `CPOConfig` with SimPO's defaults (`loss_type` simpo, or alphapo: SimPO with AlphaPO's reward
shape, which needs `alpha` other than 0; `cpo_alpha` 0: no behaviour-cloning term, which TRL takes over the
chosen prompt and answer alike; set it above 0 for CPO-SimPO), `beta`, `simpo_gamma`, `label_smoothing`,
`max_length`, ...; `ModelConfig` and the preference data keys of `hfgen.preference`. Conversational pairs reach
the trainer as text, each answer cut after its EOS (`preference.answers_cut_at_eos`): SimPO's per-token reward is
the answer's own tokens'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig
from trl.experimental.cpo import CPOConfig

from hfgen.preference import PreferenceDataArguments, check_stage, run_stage


@dataclass
class SimPOConfig(CPOConfig):
    loss_type: str = field(
        default="simpo", metadata={"help": "simpo (or alphapo, SimPO with AlphaPO's reward shape).",
                                   "choices": ["simpo", "alphapo"]},
    )  # fmt: skip
    cpo_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of a behaviour-cloning term (NLL of the chosen prompt and answer); 0 in SimPO."},
    )
    beta: float = field(default=2.0, metadata={"help": "Scale of the length-normalised reward (SimPO paper: 2-2.5)."})

    def __post_init__(self):
        # TRL's CPOConfig turns loss_type alphapo into simpo (AlphaPO is SimPO with `alpha` != 0): remembered, so
        # that check can say when alpha was left at 0
        self.alphapo = self.loss_type == "alphapo"
        super().__post_init__()


ARGUMENTS = (ModelConfig, PreferenceDataArguments, SimPOConfig)
# keys the stage refuses whenever they are set (check says why): never offered for a misspelt key
NOT_SUGGESTED = ("max_completion_length",)


def check(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: SimPOConfig) -> list[str]:
    problems = check_stage("simpo", model_args, data_args, training_args)
    if getattr(training_args, "alphapo", False) and training_args.alpha == 0:
        problems.append(
            "loss_type alphapo with alpha 0 is plain SimPO: AlphaPO's reward shape (1 - p^-alpha) / alpha needs "
            "alpha set to a value other than 0 (or use loss_type simpo)"
        )
    return problems


def run(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: SimPOConfig) -> Path:
    from trl.experimental.cpo import CPOTrainer

    return run_stage("simpo", CPOTrainer, model_args, data_args, training_args, needs_reference=False)
