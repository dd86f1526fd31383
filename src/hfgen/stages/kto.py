"""KTO (Ethayarajh et al. 2024) on TRL's `KTOTrainer`: learns from unpaired thumbs-up / thumbs-down responses,
with a frozen reference model (the starting SFT model) as DPO has.

    hfgen train recipes/tiny/kto.yaml

Data: unpaired `prompt`/`completion`/`label` rows (label true = desirable), or the preference pairs the `reward`
and `dpo` stages read, which are split into one desirable and one undesirable row each, shuffled. Keys are TRL's
`KTOConfig` (`beta`, `loss_type` kto | apo_zero_unpaired, `desirable_weight`, `undesirable_weight`,
`precompute_ref_log_probs`, `max_length`, ...), `ModelConfig` and the preference data keys of `hfgen.preference`.
TRL builds the KL term's mismatched pairs within chunks of `per_device_train_batch_size` rows and averages the KL
over the processes of a micro-batch, so the same global batch split otherwise takes another step (README).
With very unbalanced data, weigh the classes so that desirable_weight x #desirable / (undesirable_weight x
#undesirable) lies in [1, 4/3] (the KTO paper's advice).
"""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, ModelConfig

from hfgen.preference import PreferenceDataArguments, check_stage, run_stage

ARGUMENTS = (ModelConfig, PreferenceDataArguments, KTOConfig)


def check(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: KTOConfig) -> list[str]:
    problems = []
    # KTO's KL estimate pairs each row with another row's completion in the same micro-batch (TRL refuses one row,
    # with a message that names no key); apo_zero_unpaired estimates no KL
    if training_args.loss_type != "apo_zero_unpaired" and training_args.per_device_train_batch_size < 2:
        problems.append(
            f"per_device_train_batch_size must be at least 2 for KTO (loss_type {training_args.loss_type}), got "
            f"{training_args.per_device_train_batch_size}: its KL term pairs each row with another row's completion "
            "in the same micro-batch; lower gradient_accumulation_steps to keep the global batch"
        )
    return problems + check_stage("kto", model_args, data_args, training_args, unpaired_ok=True)


def run(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: KTOConfig) -> Path:
    from trl import KTOTrainer

    return run_stage("kto", KTOTrainer, model_args, data_args, training_args, needs_reference=True, unpaired=True)
