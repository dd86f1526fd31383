"""KTO (Ethayarajh et al. 2024) on TRL's `KTOTrainer`: learns from unpaired thumbs-up / thumbs-down responses,
with a frozen reference model (the starting SFT model) as DPO has.

    hfgen train recipes/tiny/kto.yaml

Data: unpaired `prompt`/`completion`/`label` rows (label true = desirable), or the preference pairs the `reward`
and `dpo` stages read, which are split into one desirable and one undesirable row each, shuffled. Keys are TRL's
`KTOConfig` (`beta`, `loss_type` kto | apo_zero_unpaired, `desirable_weight`, `undesirable_weight`,
`precompute_ref_log_probs`, `max_length`, ...), `ModelConfig` and the preference data keys of `hfgen.preference`.
With very unbalanced data, weigh the classes so that desirable_weight x #desirable / (undesirable_weight x
#undesirable) lies in [1, 4/3] (the KTO paper's advice).
"""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, ModelConfig

from hfgen.preference import PreferenceDataArguments, check_stage, run_stage

ARGUMENTS = (ModelConfig, PreferenceDataArguments, KTOConfig)


def check(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: KTOConfig) -> list[str]:
    return check_stage(model_args, data_args, training_args, unpaired_ok=True)


def run(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: KTOConfig) -> Path:
    from trl import KTOTrainer

    return run_stage("kto", KTOTrainer, model_args, data_args, training_args, needs_reference=True, unpaired=True)
