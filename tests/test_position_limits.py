"""Sequence lengths against the positions a model can read: models with learned position embeddings (GPT-2, OPT,
BERT) fail past them (an IndexError, a device-side assert on a GPU), rotary ones run on. hfgen.models'
`position_limit` tells them apart; the stages lower a Trainer's max_length and PPO's prompt room, saying so, and
refuse what cannot fit (tests/stages/test_architectures.py runs them on GPT-2)."""

from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from hfgen.errors import UserError
from hfgen.models import fit_max_length, position_limit
from hfgen.rl.models import prompt_room
from tiny_models import ARCHITECTURES


@pytest.mark.parametrize(
    "architecture, limit", [("gpt2", 256), ("opt", 256), ("llama", None), ("gpt_neox", None), ("gemma2", None)]
)
def test_only_learned_positions_have_a_limit(architecture, limit):
    assert position_limit(AutoConfig.for_model(**ARCHITECTURES[architecture])) == limit


def test_bert_and_gptj_limits():
    assert position_limit(AutoConfig.for_model("bert")) == 512  # a reward model on an encoder
    assert position_limit(AutoConfig.for_model("gptj")) is None  # rotary, named rotary_dim


def model_of(architecture: str):
    return SimpleNamespace(config=AutoConfig.for_model(**ARCHITECTURES[architecture]))


def test_a_trainer_max_length_past_the_limit_is_lowered_and_said(capsys):
    args = SimpleNamespace(max_length=1024)
    fit_max_length(model_of("gpt2"), args)
    assert args.max_length == 256 and "max_length 1024 is more than the 256 positions" in capsys.readouterr().out
    args = SimpleNamespace(max_length=1024)
    fit_max_length(model_of("llama"), args)  # rotary: left as asked
    assert args.max_length == 1024


def test_a_trainer_max_length_of_null_is_lowered_to_the_limit_too(capsys):
    # `max_length: null` (no truncation) was left as it is: rows longer than GPT-2's positions reached the model, a
    # raw IndexError in the first batch that held one (sft, reward; probe 42 E7)
    args = SimpleNamespace(max_length=None)
    fit_max_length(model_of("gpt2"), args)
    assert args.max_length == 256 and "max_length null (no truncation) would pass rows longer than the 256" in (
        capsys.readouterr().out
    )
    args = SimpleNamespace(max_length=None)
    fit_max_length(model_of("llama"), args)  # rotary: left as asked
    assert args.max_length is None
    args = SimpleNamespace()
    fit_max_length(model_of("gpt2"), args)  # no such key: nothing set
    assert not hasattr(args, "max_length")


def test_ppo_prompt_room(capsys):
    assert prompt_room(model_of("llama"), 512, 512) == 512
    assert prompt_room(model_of("gpt2"), 64, 64) == 64
    assert (
        prompt_room(model_of("gpt2"), 256, 200) == 56
        and "prompts over 56 tokens are dropped" in capsys.readouterr().out
    )
    with pytest.raises(UserError, match="response_length 256 leaves no room for a prompt in the 256 positions"):
        prompt_room(model_of("gpt2"), 64, 256)
