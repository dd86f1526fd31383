"""Direct Preference Optimization (Rafailov et al. 2023) on TRL's `DPOTrainer`: the policy learns from preference
pairs directly, the log-ratio to a frozen reference (the starting SFT model) serving as an implicit reward.

    hfgen train recipes/tiny/dpo.yaml
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/dpo.yaml

Keys are TRL's `DPOConfig` (`beta`, `loss_type` as a list: sigmoid, hinge, ipo, robust, exo_pair, nca_pair,
bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, combined with
`loss_weights`; `label_smoothing`, `precompute_ref_log_probs`, `max_length`, `truncation_mode`, ...;
`padding_free` is off in TRL 1.16's DPO, which pads), `ModelConfig` (LoRA: the reference is the adapter-disabled
policy) and the preference data keys of `hfgen.preference`, which also describes the data, the checks and
eval.json.
"""

from __future__ import annotations

from pathlib import Path

from trl import DPOConfig, ModelConfig

from hfgen.preference import PreferenceDataArguments, check_stage, run_stage

ARGUMENTS = (ModelConfig, PreferenceDataArguments, DPOConfig)
SMOOTHED_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")  # the ones TRL 1.16 reads label_smoothing in
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip


def check(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: DPOConfig) -> list[str]:
    problems = check_stage("dpo", model_args, data_args, training_args)
    unknown = [name for name in training_args.loss_type if name not in LOSS_TYPES]
    if unknown:
        problems.append(f"loss_type {unknown} unknown; DPO's loss types are {', '.join(LOSS_TYPES)}")
    if "robust" in training_args.loss_type and not 0 <= training_args.label_smoothing < 0.5:
        problems.append(
            f"label_smoothing is a flip probability in [0, 0.5) for robust DPO, got {training_args.label_smoothing}"
        )
    if training_args.label_smoothing and not set(training_args.loss_type) & set(SMOOTHED_LOSS_TYPES):
        # TRL ignores it there: a recipe asking for conservative DPO would silently train plain DPO
        problems.append(
            f"label_smoothing {training_args.label_smoothing} has no effect with loss_type {training_args.loss_type}: "
            f"only {', '.join(SMOOTHED_LOSS_TYPES)} use it (conservative DPO: loss_type robust); set it to 0 or "
            "change the loss type"
        )
    if training_args.ld_alpha is not None and not 0 <= training_args.ld_alpha <= 1:
        problems.append(
            f"ld_alpha (LD-DPO's weight of the verbose tokens) must be in [0, 1], got {training_args.ld_alpha}"
        )
    sorting = [name for name in training_args.loss_type if name in ("aot", "aot_unpaired")]
    if training_args.use_weighting and sorting:  # TRL's NotImplementedError, once the models have loaded
        problems.append(
            f"use_weighting (WPO's per-pair weights) does not work with loss_type {sorting}, which sort the pairs "
            "within a batch: set use_weighting: false or use another loss type"
        )
    return problems


def run(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: DPOConfig) -> Path:
    from trl import DPOTrainer

    return run_stage("dpo", DPOTrainer, model_args, data_args, training_args, needs_reference=True)
