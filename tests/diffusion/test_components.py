"""Pipeline components built offline: the caption tokenizer is a real CLIPTokenizer the pipeline can use."""

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from hfgen.diffusion.components import build_caption_tokenizer, build_text_encoder, is_pipeline_dir
from hfgen.diffusion.data import DIGIT_CAPTIONS, DIGIT_WORDS, digit_caption

CAPTIONS = [digit_caption(k, wording) for k in range(10) for wording in range(len(DIGIT_CAPTIONS))]


def test_caption_tokenizer_makes_every_caption_word_one_token(tmp_path):
    tokenizer = build_caption_tokenizer(CAPTIONS, max_length=16)
    for word in ["handwritten", "digit", "7", *DIGIT_WORDS]:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # saved and reloaded as the class StableDiffusionPipeline names, padded to its length like CLIP's
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    ids = reloaded("the digit seven, handwritten", padding="max_length", max_length=reloaded.model_max_length).input_ids
    assert len(ids) == 16 and ids[0] == reloaded.bos_token_id and reloaded.eos_token_id in ids
    # words it never saw still tokenize (byte-level alphabet), into several pieces
    assert len(reloaded.tokenize("zebra")) > 1


def test_text_encoder_takes_its_vocabulary_and_length_from_the_tokenizer(tmp_path):
    import torch

    config = tmp_path / "clip.json"
    config.write_text('{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}')
    tokenizer = build_caption_tokenizer(CAPTIONS, max_length=12)
    encoder = build_text_encoder(str(config), tokenizer)
    assert encoder.config.vocab_size == len(tokenizer) and encoder.config.max_position_embeddings == 12
    ids = tokenizer(["a handwritten digit 3"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids).last_hidden_state
    assert states.shape == (1, 12, 16)


def test_pipeline_dirs_are_recognised(tmp_path):
    assert not is_pipeline_dir(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    assert is_pipeline_dir(tmp_path)


def test_a_lora_runs_local_base_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    # a relative base (`outputs/tiny/t2i`) made `hfgen generate RUN` fail from any other directory
    from types import SimpleNamespace

    from hfgen.diffusion.components import lora_run_base
    from hfgen.diffusion.image_stage import write_lora_base

    (tmp_path / "base").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    write_lora_base(Path("run"), SimpleNamespace(pretrained_model_name_or_path="base", revision=None, variant=None), {})
    assert lora_run_base(tmp_path / "run")["pretrained_model_name_or_path"] == str(tmp_path / "base")
    write_lora_base(
        Path("run"), SimpleNamespace(pretrained_model_name_or_path="org/sd", revision="r", variant=None), {}
    )
    assert lora_run_base(tmp_path / "run")["pretrained_model_name_or_path"] == "org/sd"  # a hub id stays one


def test_a_pipelines_scheduler_is_taken_from_diffusers_only_its_named_module_is_not_imported(tmp_path, monkeypatch):
    # model_index.json's scheduler entry ["this", "DDIMScheduler"] imported (ran) the module `this`, then ended in
    # a raw AttributeError; a module beside the pipeline ran its code with no trust_remote_code (probe 40 D2)
    import json

    from diffusers import DDIMScheduler

    from hfgen.diffusion.components import pretrained_sampler
    from hfgen.errors import UserError

    DDIMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\nDDIMScheduler = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for entry in (["planted", "DDIMScheduler"], ["diffusers", "StableDiffusionPipeline"]):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "scheduler": entry}))
        with pytest.raises(UserError, match=r"names the scheduler .* which is not a diffusers scheduler"):
            pretrained_sampler(str(tmp_path), None)
    assert not (tmp_path / "RAN").exists()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "scheduler": ["diffusers", "DDIMScheduler"]})
    )
    assert pretrained_sampler(str(tmp_path), None).config.num_train_timesteps == 50


def test_a_lora_file_beside_a_model_or_in_an_hfgen_run_is_not_taken_for_a_diffusers_lora(tmp_path):
    """A diffusers LoRA file without lora_base.json is told to name its base (probe 44 B6), but not where the dir holds
    more: a pipeline saved beside its LoRA (it loads as the pipeline) or an hfgen t2i LoRA run interrupted between
    its LoRA file and its lora_base.json (an unfinished run, to rerun), which the B6 check had refused (review 44 #1)."""
    from hfgen.models import not_a_model_dir

    lone, pipeline, unfinished = (tmp_path / name for name in ("lone", "pipeline", "unfinished"))
    for directory in (lone, pipeline, unfinished):
        directory.mkdir()
        (directory / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (unfinished / "recipe.yaml").write_text("stage: t2i\n")
    assert "is a diffusers LoRA" in not_a_model_dir(lone)
    assert not_a_model_dir(pipeline) is None
    assert "is an unfinished hfgen run" in not_a_model_dir(unfinished)
