"""ORPO (Hong et al. 2024) on TRL's experimental `ORPOTrainer`: a language-modelling (NLL) term on the chosen
sequences plus an odds-ratio penalty on the rejected ones, in one loss and without a reference model. TRL takes the
NLL over the prompt's tokens and the answer's alike (every attended token; it has no key to mask the prompt), unlike
the `sft` stage's assistant_only_loss; the odds ratio reads the answers only.

    hfgen train recipes/tiny/orpo.yaml

Keys are TRL's `ORPOConfig` (`beta`: the odds-ratio term's weight, lambda in the paper; `max_length`: the
answer is cut to fit, the prompt kept whole; `max_completion_length` is refused: TRL reads it for encoder-decoder
models only; ...), `ModelConfig` and the preference data keys of `hfgen.preference`. ORPO is meant to
start from a base model as well as an SFT one; the held-out comparison is always against the starting model.
Conversational pairs reach the trainer as text, each answer cut after its EOS (`preference.answers_cut_at_eos`).
"""

from __future__ import annotations

from pathlib import Path

from trl import ModelConfig
from trl.experimental.orpo import ORPOConfig

from hfgen.preference import PreferenceDataArguments, check_stage, run_stage

ARGUMENTS = (ModelConfig, PreferenceDataArguments, ORPOConfig)
# keys the stage refuses whenever they are set (check says why): never offered for a misspelt key
NOT_SUGGESTED = ("max_completion_length",)


def check(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: ORPOConfig) -> list[str]:
    return check_stage("orpo", model_args, data_args, training_args)


def run(model_args: ModelConfig, data_args: PreferenceDataArguments, training_args: ORPOConfig) -> Path:
    from trl.experimental.orpo import ORPOTrainer

    return run_stage("orpo", ORPOTrainer, model_args, data_args, training_args, needs_reference=False)
