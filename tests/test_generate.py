"""`hfgen generate` (and `generate_tokens`, which `hfgen eval` samples with): PPO's sampling whatever the model's
generation_config.json says, every EOS id stops, one seed gives one answer from an adapter and its merge, a long
prompt shortens only its own answer, and the other modality's options are refused."""

import json
import pickle

import pytest
import torch

from conftest import run_hfgen_here
from hfgen.cli import main as hfgen
from tiny_models import pretrained_tiny_llama, save_tiny_causal_lm


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return pretrained_tiny_llama(tmp_path_factory)  # pretrained: its greedy answer does not repeat one token


@pytest.fixture
def model_and_tokenizer(llama_dir):
    from hfgen.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(llama_dir)), load_tokenizer(str(llama_dir))


def test_generate_samples_as_ppo_whatever_the_generation_config_says(model_and_tokenizer):
    """transformers' default top_k=50 and a generation_config.json's top_k / repetition_penalty applied in generate
    and eval (top_k=1 made every sample the greedy one), while PPO samples from softmax(logits / T) with top-p."""
    from hfgen.generate import generate_tokens
    from hfgen.rl.models import make_generation_config, stop_token_ids
    from hfgen.rl.rollout import left_pad, sample_responses

    model, tokenizer = model_and_tokenizer
    model.generation_config.update(top_k=1, repetition_penalty=5.0)
    torch.manual_seed(0)
    ours = generate_tokens(model, tokenizer, ["the cat"], max_new_tokens=12, temperature=0.8, top_p=0.95, num_samples=6)
    stop_ids = stop_token_ids(tokenizer, model)
    config = make_generation_config(tokenizer, 12, 0.8, 0.95, stop_ids, models=[model])
    query_ids, query_mask = left_pad([ours[0][0].prompt_ids] * 6, tokenizer.pad_token_id, "cpu")
    torch.manual_seed(0)
    ppo = sample_responses(model, query_ids, query_mask, config, 6, tokenizer.pad_token_id).response_ids.tolist()
    for completion, ids in zip(ours[0], ppo):
        end = next((at + 1 for at, token in enumerate(ids) if token in stop_ids), len(ids))
        assert completion.completion_ids == ids[:end] and completion.finished == (end < len(ids) or ids[-1] in stop_ids)
    assert len({tuple(c.completion_ids) for c in ours[0]}) > 1  # not the greedy answer six times


def test_generate_stops_at_every_eos_id_of_the_generation_config(model_and_tokenizer):
    """PPO/GRPO stop at every EOS id of the generation config (chat models list several); generate and eval ran past
    all but the tokenizer's, and the reward scorer saw such a response as unfinished."""
    from hfgen.generate import generate_tokens

    model, tokenizer = model_and_tokenizer
    greedy = generate_tokens(model, tokenizer, ["the cat"], max_new_tokens=8, temperature=0)[0][0].completion_ids
    stop = next(token for at, token in enumerate(greedy) if at >= 2 and token not in greedy[:at])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    model.generation_config.repetition_penalty = 5.0  # greedy decoding ignores it too
    stopped = generate_tokens(model, tokenizer, ["the cat"], max_new_tokens=8, temperature=0)[0][0]
    assert stopped.completion_ids == greedy[: greedy.index(stop) + 1] and stopped.finished


def test_one_seed_samples_the_same_from_an_adapter_and_its_merged_model(llama_dir, tmp_path, capsys):
    """The seed was set before loading: a LoRA adapter's initialisation drew from the RNG, and the adapter dir
    sampled other answers than its merged model."""
    from peft import LoraConfig, get_peft_model

    from hfgen.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(llama_dir))
    lora = get_peft_model(load_causal_lm(str(llama_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # an adapter that changes the model
    lora.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")
    lora.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    outputs = []
    for model in ("lora", "merged"):
        arguments = ["--prompt", "the cat", "--num_samples", "3", "--max_new_tokens", "8", "--no-chat", "--seed", "3"]
        assert hfgen(["generate", str(tmp_path / model), *arguments]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_a_prompts_samples_depend_on_the_seed_and_the_prompt_not_on_the_batch_or_the_other_prompts(
    llama_dir, model_and_tokenizer, capsys
):
    """`hfgen generate` drew every prompt's samples from one global generator in batch order: "the cat" alone, with
    a prompt after it or with one before it got three other sets of samples from one --seed (`hfgen eval` the same
    with --batch_size and --num_prompts)."""
    from hfgen.generate import generate_tokens, prompt_seeds

    def generated(*prompts):
        arguments = ["--num_samples", "3", "--max_new_tokens", "8", "--no-chat", "--seed", "3"]
        assert hfgen(["generate", str(llama_dir), *[a for p in prompts for a in ("--prompt", p)], *arguments]) == 0
        samples: dict = {}
        for block in capsys.readouterr().out.split("### ")[1:]:
            prompt, text = block.split("\n", 1)
            samples.setdefault(prompt, []).append(text)
        return samples

    alone = generated("the cat")["the cat"]
    assert len(set(alone)) > 1
    assert generated("the cat", "a dog")["the cat"] == alone == generated("a dog", "the cat")["the cat"]

    model, tokenizer = model_and_tokenizer
    prompts = ["the cat", "a dog", "the cat", "the fox is"]  # a repeated prompt samples afresh
    seeds = prompt_seeds(3, prompts)
    texts = []
    for batch_size in (1, 3, 64):
        groups = generate_tokens(
            model, tokenizer, prompts, max_new_tokens=8, num_samples=2, batch_size=batch_size, seeds=seeds
        )
        texts.append([[completion.text for completion in group] for group in groups])
    assert texts[0] == texts[1] == texts[2] and texts[0][0] != texts[0][2]


def test_a_long_prompt_lowers_max_new_tokens_for_itself_only(tmp_path):
    """With learned positions (GPT-2's 256) a long prompt lowered max_new_tokens for its whole batch (the padded
    length): "the dog" got 16 new tokens beside a 240-token prompt, 30 alone."""
    from hfgen.generate import generate_tokens
    from hfgen.models import load_causal_lm, load_tokenizer

    path = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    long = " ".join(["the cat sleeps."] * 200)
    long = tokenizer.decode(tokenizer(long)["input_ids"][:240])
    length = len(tokenizer(long)["input_ids"])
    alone, (short, cut) = (
        generate_tokens(model, tokenizer, prompts, max_new_tokens=30, temperature=0)
        for prompts in (["the dog"], ["the dog", long])
    )
    assert short == alone[0]
    assert len(short[0].completion_ids) == 30 or short[0].finished
    assert len(cut[0].completion_ids) == 256 - length or cut[0].finished


def test_generate_refuses_the_other_modality_s_options(llama_dir, tmp_path):
    """They were ignored (exit 0, no --output_dir made), while `hfgen eval` refuses them."""
    text = run_hfgen_here("generate", llama_dir, "--prompt", "the cat", "--guidance_scale", "9",
                          "--num_inference_steps", "3", "--output_dir", tmp_path / "gtxt")  # fmt: skip
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    image = run_hfgen_here("generate", pipeline, "--prompt", "a handwritten digit 3", "--temperature", "0",
                           "--top_p", "0.5", "--max_new_tokens", "3", "--no-chat")  # fmt: skip
    for result, names in (
        (text, ["--guidance_scale", "--num_inference_steps", "--output_dir"]),
        (image, ["--temperature", "--top_p", "--max_new_tokens", "--chat"]),
    ):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert all(name in result.stderr for name in names) and "leave them out" in result.stderr, result.stderr
    assert not (tmp_path / "gtxt").exists()


def image_artefacts_that_are_no_pipeline(root):
    """{dir: what generate and eval say of it}: a VAE run's output, a pipeline's unet/ folder, a diffusers LoRA
    (as diffusers' LoRA scripts save it: no lora_base.json) and a t2i run's checkpoint (resume state only)."""
    from hfgen import tracking

    vae, unet, lora, run = root / "vae", root / "t2i" / "unet", root / "diffusers_lora", root / "t2i_run"
    for path, kind in ((vae, "AutoencoderKL"), (unet, "UNet2DConditionModel")):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"_class_name": kind}))
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    checkpoint = run / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    for recipe in (run / "recipe.yaml", checkpoint / "recipe.yaml"):
        recipe.write_text("stage: t2i\n")
    (checkpoint / "model.safetensors").write_bytes(b"")
    tracking.write_json(checkpoint / "hfgen_state.json", {})
    return {
        vae: "is a diffusers AutoencoderKL (a vae or other component run), not a pipeline",
        unet: "is a diffusers UNet2DConditionModel",
        lora: "is a diffusers LoRA (pytorch_lora_weights.safetensors), which names no base pipeline: hfgen loads one "
        "onto the base named in a lora_base.json beside it, as its t2i LoRA runs write it; write "
        f'{{"pretrained_model_name_or_path": "BASE"}} into \'{lora / "lora_base.json"}\'',
        checkpoint: "an image stage's checkpoint holds only that state (no pipeline, unet/ folder or LoRA file, unlike "
        "those of diffusers' training scripts); use the finished run's dir, or for the model of an earlier step train "
        "a run of that many steps (max_train_steps)",
    }


def test_an_image_artefact_that_is_no_pipeline_is_refused_for_what_it_is_with_or_without_image_options(
    tmp_path, capsys
):
    """Given an image option, generate and eval called a VAE, a unet/ folder, a diffusers LoRA and a t2i checkpoint "a
    text model" and told the user to leave the option out, which then met the refusal of what the dir is (probe 44
    B1). A diffusers LoRA was "a directory without a config.json or adapter_config.json" (B6); an image checkpoint was
    told to use the finished run's dir only (B5)."""
    for model, message in image_artefacts_that_are_no_pipeline(tmp_path).items():
        for command in (["generate", str(model), "--prompt", "a digit"], ["eval", str(model), "--quiet"]):
            for options in ([], ["--num_inference_steps", "2"], ["--guidance_scale", "3"]):
                with pytest.raises(SystemExit) as exit_info:
                    hfgen([*command, *options])
                error = capsys.readouterr().err
                assert exit_info.value.code == 2 and "Traceback" not in error, error
                assert message in error and "a text model" not in error, (command, options, error)
    # merge and a t2i LoRA run starting from the diffusers LoRA are told what it needs too
    lora = tmp_path / "diffusers_lora"
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["merge", str(lora), "--output_dir", str(tmp_path / "merged")])
    assert exit_info.value.code == 2 and "is a diffusers LoRA" in capsys.readouterr().err
    result = run_hfgen_here("check", "recipes/tiny/t2i_digits_lora.yaml", "--pretrained_model_name_or_path", lora)
    assert result.returncode == 2 and f"pretrained_model_name_or_path '{lora}' is a diffusers LoRA" in result.stderr


def test_generate_refuses_a_temperature_that_is_not_finite_and_a_seed_past_64_bits(llama_dir, tmp_path):
    """They ended in transformers' or torch's tracebacks (a nan temperature passed `< 0` and `== 0`; torch.manual_seed
    overflowed), as --top_p nan did not."""
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for model, arguments, message in (
        (llama_dir, ["--temperature", "nan"], "--temperature must be a finite number (0 is greedy decoding), got nan"),
        (llama_dir, ["--temperature", "inf"], "--temperature must be a finite number (0 is greedy decoding), got inf"),
        (llama_dir, ["--seed", str(2**64)], f"--seed must be a 64-bit integer, from {-(2**63)} to {2**63 - 1}"),
        (pipeline, ["--seed", str(-(2**63) - 1)], "--seed must be a 64-bit integer"),  # (before the pipeline loads)
        (llama_dir, ["--prompt", "  "], "--prompt '  ' is empty"),  # (the whitespace given was shown as '')
    ):
        result = run_hfgen_here("generate", model, "--prompt", "the cat", *arguments)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert run_hfgen_here("generate", llama_dir, "--prompt", "the cat", "--seed", str(2**63 - 1),
                          "--max_new_tokens", "2").returncode == 0  # fmt: skip


def test_generate_refuses_a_guidance_scale_that_is_not_finite(tmp_path):
    """inf rendered all-black images (NaN pixels cast to 0) and nan unguided ones, both with exit 0: refused before
    the pipeline loads, given or from the run's recipe."""
    pipeline, recipe_run = tmp_path / "pipeline", tmp_path / "run"
    for path in (pipeline, recipe_run):
        path.mkdir()
        (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (recipe_run / "recipe.yaml").write_text("stage: t2i\nguidance_scale: .inf\n")
    for model, arguments, message in (
        (pipeline, ["--guidance_scale", "inf"], "--guidance_scale must be a finite number, got inf"),
        (pipeline, ["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
        (recipe_run, [], f"the recipe of '{recipe_run}' has guidance_scale inf"),
    ):
        result = run_hfgen_here("generate", model, "--prompt", "a digit", *arguments, "--output_dir", tmp_path / "out")
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_rendered_images_replace_only_the_images_an_earlier_render_wrote(tmp_path):
    """save_images deleted every PNG of the --output_dir whose name fit its pattern (NN-words-K.png, grid.png): a
    user's 2023-06-beach-1.png and 12-holiday-2.png went without a word. It lists what it writes and deletes only
    that; a user's file of a name it would write is refused, before a render (generate) and at the save."""
    from PIL import Image

    from hfgen.diffusion.rendering import save_images
    from hfgen.errors import UserError

    photos = tmp_path / "photos"
    photos.mkdir()
    mine = {name: bytes([i]) * 8 for i, name in enumerate(["2023-06-beach-1.png", "12-holiday-2.png", "me.png"])}
    for name, data in mine.items():
        (photos / name).write_bytes(data)
    image = Image.new("RGB", (8, 8), "white")
    paths = save_images([[image, image], [image]], ["a digit 1", "a digit 2"], photos)
    assert [p.name for p in paths] == ["00-a-digit-1-0.png", "00-a-digit-1-1.png", "01-a-digit-2-0.png", "grid.png"]
    save_images([[image]], ["a digit 3"], photos)  # fewer: the first render's other images go, the user's stay
    ours = ["00-a-digit-3-0.png", "grid.png"]
    assert {name: (photos / name).read_bytes() for name in mine if (photos / name).exists()} == mine
    assert sorted(p.name for p in photos.iterdir()) == sorted([*mine, *ours, "hfgen_images.json"])
    assert json.loads((photos / "hfgen_images.json").read_text()) == {"images": ours}
    # a user's file of a name a render writes: refused, at the save and (generate) before the pipeline loads
    own = tmp_path / "own"
    own.mkdir()
    (own / "grid.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="holds grid.png, which no hfgen render wrote there"):
        save_images([[image]], ["a digit 3"], own)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    result = run_hfgen_here("generate", pipeline, "--prompt", "a digit 3", "--output_dir", own)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--output_dir '{own}' holds grid.png, which no hfgen render wrote there" in result.stderr
    assert sorted(p.name for p in own.iterdir()) == ["grid.png"] and (own / "grid.png").read_bytes() == b"mine"


def test_the_output_of_a_run_that_trusted_its_models_code_loads_for_generate_eval_and_merge(tmp_path, capsys):
    # A run with trust_remote_code: true keeps the model's code beside the weights, but generate, eval and merge
    # loaded with trust_remote_code=False and passed on transformers' "pass the argument `trust_remote_code=True`",
    # an argument none of them has. A hand-written recipe.yaml line and any COMPLETE file were trusted as such a run
    # (a downloaded dir can carry both: probe 40 D8): a run's record is asked for, and the code run is named.
    from hfgen import tracking
    from hfgen.errors import UserError
    from hfgen.models import load_causal_lm
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tinycustom", auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                  "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n"
    )
    (model / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )
    refused = "brings its own model code, which hfgen runs only for the output of a run"
    with pytest.raises(UserError, match=refused):
        load_causal_lm(str(model))
    for recipe, marker in [("trust_remote_code: true\n", {}), ("trust_remote_code: true\n", {"run": "1"}),
                           ("stage: sft\ntrust_remote_code: true\n", {})]:  # fmt: skip
        (model / "recipe.yaml").write_text(recipe)
        (model / "COMPLETE").write_text(json.dumps(marker))
        with pytest.raises(UserError, match=refused):
            load_causal_lm(str(model))
    tracking.mark_complete(model)
    capsys.readouterr()
    assert type(load_causal_lm(str(model))).__name__ == "TinyCustomForCausalLM"
    said = capsys.readouterr().err
    assert f"hfgen: running the model code in '{model}' (configuration_tiny.py, modeling_tiny.py)" in said
    assert said.count("running the model code") == 1  # once, though the tokenizer and the model both load it


def test_a_reward_model_that_trusted_its_code_loads_as_hfgen_evals_judge_and_another_is_refused(tmp_path):
    # hfgen eval --reward_model of such a run: its tokenizer ran the code, its model load (trust None) asked on
    # stdin "[y/N]" and then advised an argument eval does not have (probe 40 D3)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hfgen import tracking
    from hfgen.errors import UserError
    from hfgen.evaluation.command import load_reward_model
    from hfgen.models import build_embedded_tokenizer

    model = tmp_path / "reward"
    tokenizer = build_embedded_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tinyscorer", auto_map={"AutoConfig": "scorer.TinyScorerConfig",
                  "AutoModel": "scorer.TinyModel", "AutoModelForSequenceClassification": "scorer.TinyScorer"})  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "scorer.py").write_text(
        "from transformers import AutoModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel\n\n\n"
        "class TinyScorerConfig(LlamaConfig):\n    model_type = 'tinyscorer'\n\n\n"
        "class TinyModel(LlamaModel):\n    config_class = TinyScorerConfig\n\n\n"
        "AutoModel.register(TinyScorerConfig, TinyModel, exist_ok=True)\n\n\n"
        "class TinyScorer(LlamaForSequenceClassification):\n    config_class = TinyScorerConfig\n"
    )
    with pytest.raises(UserError, match="--reward_model: could not load a sequence classifier .* brings its own"):
        load_reward_model(str(model), "cpu")
    (model / "recipe.yaml").write_text("stage: reward\ntrust_remote_code: true\n")
    tracking.mark_complete(model)  # the output of a reward run that trusted its code
    assert type(load_reward_model(str(model), "cpu")[1]).__name__ == "TinyScorer"


@pytest.mark.parametrize("command", ["generate", "eval", "merge"])
def test_a_one_process_command_launched_on_several_processes_exits_2(llama_dir, tmp_path, monkeypatch, command):
    """Under `accelerate launch --num_processes 2` each process ran the whole command and wrote the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    options = {"generate": ["--prompt", "the cat"], "eval": ["--output", tmp_path / "eval.json"],
               "merge": ["--output_dir", tmp_path / "merged"]}[command]  # fmt: skip
    result = run_hfgen_here(command, llama_dir, *options)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"`hfgen {command}` runs on one process, but 2 were launched (WORLD_SIZE=2)" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("layout", "chat"), [("alpaca", False), ("text", False), ("messages", True), (None, True)])
def test_an_older_run_without_trained_on_chat_is_prompted_as_its_rows_were(tmp_path, capsys, layout, chat):
    # an SFT run of an older hfgen (no trained_on_chat in eval.json) trained on Alpaca rows was prompted in the chat
    # template by `hfgen generate` / `eval`, a format it never saw (probe 40 D1); its data.json names its rows' layout.
    # A run neither record tells about is prompted in the template, saying so
    from types import SimpleNamespace

    import yaml

    from hfgen import tracking
    from hfgen.generate import wants_chat

    run = tmp_path / "sft"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"stage": "sft", "output_dir": str(run)}))
    tracking.write_json(run / "eval.json", {"train_loss": 1.0})
    tracking.write_json(run / "data.json", {"train": {"format": layout}} if layout else {})
    assert wants_chat(str(run), SimpleNamespace(chat_template="{{ messages }}")) is chat
    assert ("does not record whether it prompted" in capsys.readouterr().err) is (layout is None)


def test_a_bin_weights_file_holding_other_objects_than_tensors_is_refused_naming_it(llama_dir, tmp_path):
    # torch's weights_only guard stopped such a pickle (no code ran) but hfgen generate ended in its raw
    # UnpicklingError, advising to load with weights_only=False (probe 40 D6)
    import shutil

    from hfgen.errors import UserError
    from hfgen.models import load_causal_lm

    model = tmp_path / "bin_model"
    shutil.copytree(llama_dir, model)
    from safetensors.torch import load_file

    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save({**state, "planted": PlantedObject()}, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="a model.s .bin weights file holds objects other than tensors"):
        load_causal_lm(str(model))
    # the training stages load through TRL and transformers (their raw UnpicklingError too: probe 40 I2)
    result = run_hfgen_here("train", "recipes/tiny/sft_full.yaml", "--model_name_or_path", str(model), "--output_dir",
                            str(tmp_path / "run"), "--max_steps", "1", "--max_train_samples", "8")  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds objects other than tensors" in result.stderr and "Traceback" not in result.stderr


def test_a_weights_only_refusal_of_a_checkpoint_state_keeps_its_traceback(tmp_path):
    # every torch weights-only refusal inside hfgen's commands was reported as "a model's .bin weights file" (exit 2,
    # no file, no traceback), a resume's rng_state.pth or optimizer.pt too (review 40 F7): only a model's load is
    from hfgen.errors import exit_on_user_error

    torch.save({"python": PlantedObject()}, tmp_path / "rng_state.pth")  # as Trainer._load_rng_state reads it
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"), exit_on_user_error():
        torch.load(tmp_path / "rng_state.pth", weights_only=True)


class PlantedObject:
    def __reduce__(self):  # what a crafted pickle would run on load
        return (print, ("planted code ran",))


def test_sampling_as_ppo_raises_no_warning_about_settings_hfgen_pinned(model_and_tokenizer):
    # pinning min_length=0 beside min_new_tokens made transformers warn "Both `min_new_tokens` and `min_length` seem
    # to have been set" at every generate: each PPO rollout, six times an `hfgen eval` (probe 42 D1)
    import logging

    from hfgen.generate import generate_tokens

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    model, tokenizer = model_and_tokenizer
    lines, logger = Lines(), logging.getLogger("transformers")
    logger.addHandler(lines)
    try:
        generate_tokens(model, tokenizer, ["the cat"], max_new_tokens=4, temperature=0.8, top_p=1.0)
        generate_tokens(model, tokenizer, ["the cat"], max_new_tokens=4, min_new_tokens=4, temperature=0.8, top_p=1.0)
    finally:
        logger.removeHandler(lines)
    assert not [m for m in lines.messages if "seem to have been set" in m], lines.messages
