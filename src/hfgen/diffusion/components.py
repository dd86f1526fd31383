"""The parts of a latent text-to-image pipeline (Stable Diffusion layout), built from configs or loaded.

    tokenizer      CLIPTokenizer: a pretrained one, or `embedded:caption-bpe`, a CLIP-style BPE trained here on
                   the training captions (every caption word becomes one token), saved as a normal CLIPTokenizer
    text_encoder   CLIPTextModel (frozen unless the recipe trains it)
    vae            AutoencoderKL: pretrained, or an earlier `vae` stage's output dir
    unet           UNet2DConditionModel: pretrained, or built from a JSON config (from scratch)
    scheduler      DDPMScheduler for training; the pipeline keeps the pretrained pipeline's sampler, or DDIM when
                   built from scratch
    discriminator  a PatchGAN (`patch_discriminator`): the critic of a VAE trained with a GAN term (the vae stage)

`save_pipeline` writes them as a StableDiffusionPipeline, so `DiffusionPipeline.from_pretrained(dir)` runs it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hfgen.errors import UserError
from hfgen.models import check_config_file, check_model_source

CAPTION_TOKENIZER = "embedded:caption-bpe"
# Stable Diffusion 1.x's training noise schedule: the default for pipelines built from scratch.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
LORA_BASE = "lora_base.json"  # names the pipeline a LoRA run's adapter belongs on


@dataclass
class PipelineArguments:
    """Which pipeline the t2i stage starts from: a pretrained one, or components built from configs."""

    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A diffusers pipeline to fine-tune: hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
                  "or local dir (an earlier t2i run's output_dir works)."},
    )  # fmt: skip
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the pretrained pipeline."})
    variant: str | None = field(
        default=None, metadata={"help": "Weights variant of the pretrained pipeline, e.g. fp16."}
    )
    unet_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: UNet2DConditionModel config JSON (e.g. recipes/tiny/unet_digits.json)."},
    )
    vae_name_or_path: str | None = field(
        default=None,
        metadata={"help": "From scratch: an AutoencoderKL dir (a `vae` stage's output_dir) or hub id. With a pretrained "
                  "pipeline: replaces its VAE."},
    )  # fmt: skip
    text_encoder_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: CLIPTextConfig JSON (vocab size and token ids come from the tokenizer)."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": f"From scratch: a CLIPTokenizer dir or hub id, or '{CAPTION_TOKENIZER}' (a CLIP-style BPE trained "
                  "here on the training captions)."},
    )  # fmt: skip
    text_encoder_pretraining_steps: int = field(
        default=0,
        metadata={"help": "From scratch: CLIP contrastive pretraining steps for the new text encoder on the training "
                  "image-caption pairs, before it is frozen (see hfgen/diffusion/text_pretraining.py); 0: none."},
    )  # fmt: skip
    max_caption_tokens: int = field(
        default=16, metadata={"help": f"Token length of captions for '{CAPTION_TOKENIZER}' (CLIP uses 77)."}
    )
    scheduler_config: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: DDPMScheduler config JSON (default: Stable Diffusion 1.x's schedule; its "
            "prediction_type: epsilon or v_prediction)."
        },
    )
    prediction_type: str | None = field(
        default=None,
        metadata={"help": "What the UNet predicts: epsilon or v_prediction (default: the scheduler's).",
                  "choices": ["epsilon", "v_prediction"]},
    )  # fmt: skip


def check_pipeline_arguments(args: PipelineArguments) -> list[str]:
    problems = []
    if args.pretrained_model_name_or_path:
        scratch_keys = [
            k for k in ("unet_config", "text_encoder_config", "tokenizer_name", "scheduler_config") if getattr(args, k)
        ]  # (scheduler_config too: a pretrained pipeline's scheduler would be trained with, not the file's)
        if scratch_keys:
            problems.append(
                f"{', '.join(scratch_keys)} build a pipeline from scratch; drop them or pretrained_model_name_or_path"
            )
        name = args.pretrained_model_name_or_path
        problems += (
            lora_run_as_base_problems(name)
            or check_model_source("pretrained_model_name_or_path", name)
            or pipeline_class_problems(name, "t2i")
            or [f"pretrained_model_name_or_path {problem}" for problem in missing_component_problems(name)]
        )
    else:
        missing = [
            k
            for k in ("unet_config", "vae_name_or_path", "text_encoder_config", "tokenizer_name")
            if not getattr(args, k)
        ]
        if missing:
            problems.append(
                "set pretrained_model_name_or_path (fine-tune a pipeline), or build one from scratch with unet_config, "
                f"vae_name_or_path, text_encoder_config and tokenizer_name (missing: {', '.join(missing)})"
            )
    for key in ("unet_config", "text_encoder_config", "scheduler_config"):
        problems += check_config_file(key, getattr(args, key))
    problems += check_model_source("vae_name_or_path", args.vae_name_or_path, hint="train one with the vae stage first")
    if args.tokenizer_name != CAPTION_TOKENIZER:
        problems += check_model_source("tokenizer_name", args.tokenizer_name)
    if args.text_encoder_pretraining_steps and args.pretrained_model_name_or_path:
        problems.append("text_encoder_pretraining_steps pretrains a text encoder built from scratch; drop it")
    if args.max_caption_tokens < 4:
        problems.append(f"max_caption_tokens must be at least 4, got {args.max_caption_tokens}")
    if problems:
        return problems
    return scheduler_prediction_problems(args) + unet_config_problems(args)


T2I_PIPELINES = ("StableDiffusionPipeline",)  # the layout the t2i stage loads (SD 1.x/2.x) and saves


def pipeline_class_problems(name: str, stage: str) -> list[str]:
    """A pretrained pipeline whose model_index.json (a local dir's, or a hub repo's already cached: nothing is
    downloaded) names a class `stage` does not train, naming the stage that does: t2i refused an SD3 or Flux dir only
    at load ("no file named config.json"), t2i_flow an SDXL one only after loading every component."""
    from hfgen.diffusion.flow_components import FLOW_PIPELINES, pipeline_config

    trains = {"t2i": (T2I_PIPELINES, "SD 1.x/2.x"), "t2i_flow": (FLOW_PIPELINES, "SD3, SD3.5, Flux.1")}
    index = pipeline_config(name, "model_index.json")
    if index is None and Path(name).expanduser().is_dir():  # diffusers said a file the dir holds was missing
        from hfgen.models import what_model_dir_holds

        what = what_model_dir_holds(name) or "a dir without a model_index.json"
        vae = ": give it as vae_name_or_path" if what.startswith("a diffusers AutoencoderKL") else ""
        return [f"pretrained_model_name_or_path '{name}' is not a diffusers pipeline (no model_index.json): it is "
                f"{what}{vae}"]  # fmt: skip
    found = (index or {}).get("_class_name")
    if not found or found in trains[stage][0]:
        return []
    other = next((other for other, (classes, _) in trains.items() if found in classes), None)
    where = f"train it with `stage: {other}`" if other else "no hfgen stage trains it (SDXL is not supported)"
    classes, families = trains[stage]
    return [f"pretrained_model_name_or_path '{name}' is a {found} (its model_index.json's _class_name); the {stage} "
            f"stage trains {' and '.join(classes)} pipelines ({families}): {where}"]  # fmt: skip


def missing_component_problems(name: str) -> list[str]:
    """The components a local pipeline dir's model_index.json names that its dir lacks: a folder absent or empty,
    or a model's folder (its config.json) without a weights file (a variant's counts). diffusers' own message
    names the pipeline's root only, and only once the components before it have loaded."""
    index = Path(name) / "model_index.json"
    if not index.is_file():
        return []
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except ValueError:
        return [f"'{name}': its model_index.json is not valid JSON"]
    problems = []
    for component, value in components.items():
        if component.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        folder = Path(name) / component
        weights = [f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")] if folder.is_dir() else []
        if not folder.is_dir() or not any(folder.iterdir()):
            problems.append(f"'{name}': its model_index.json names the component {component} ({value[-1]}), but "
                            f"{component}/ is missing or empty")  # fmt: skip
        elif (folder / "config.json").is_file() and not weights:
            problems.append(f"'{name}': {component}/ ({value[-1]}) has no weights "
                            "file (.safetensors or .bin)")  # fmt: skip
    return problems


TRAINED_PREDICTIONS = ("epsilon", "v_prediction")  # the loss targets this stage computes (the recipe key's choices)


def scheduler_prediction_problems(args: PipelineArguments) -> list[str]:
    """A scheduler (scheduler_config, or a pretrained pipeline's) whose prediction_type the loss does not compute:
    the UNet would be trained to predict noise while the saved scheduler reads its output as that type. Read before
    anything loads (skipped for a hub pipeline not yet downloaded); the recipe's `prediction_type` replaces it."""
    from hfgen.diffusion.flow_components import pipeline_config

    if args.prediction_type:
        return []
    if args.scheduler_config:
        config, source = read_config(args.scheduler_config), f"scheduler_config '{args.scheduler_config}'"
    elif args.pretrained_model_name_or_path:
        name = args.pretrained_model_name_or_path
        config, source = pipeline_config(name, "scheduler/scheduler_config.json"), f"the scheduler of '{name}'"
    else:
        return []
    kind = (config or {}).get("prediction_type", "epsilon")
    if kind in TRAINED_PREDICTIONS:
        return []
    return [f"{source} has prediction_type '{kind}', which this stage does not train (its loss targets: "
            f"{' or '.join(TRAINED_PREDICTIONS)}): set the recipe's prediction_type to one of them (the saved "
            "scheduler then reads the UNet's output that way), or use a scheduler config with one"]  # fmt: skip


def vae_config_of(vae_name_or_path: str | None, pretrained: str | None) -> dict | None:
    """The config of the VAE a pipeline will use (`vae_name_or_path`: a VAE dir or a pipeline's, else the
    pretrained pipeline's `vae`), or None where it is not at hand (a hub repo not downloaded)."""
    from hfgen.diffusion.flow_components import pipeline_config

    if vae_name_or_path:
        return pipeline_config(vae_name_or_path, "config.json") or pipeline_config(vae_name_or_path, "vae/config.json")
    return pipeline_config(pretrained, "vae/config.json") if pretrained else None


def denoiser_config_problems(key: str, name: str, config: dict, expected: str, vae_config: dict | None) -> list[str]:
    """A denoiser config (`key`'s file or a pretrained pipeline's) for another model class than the stage builds
    (its `_class_name`), or whose in/out channels differ from the VAE's latent_channels: either fails only after
    the text encoders are pretrained and the data encoded."""
    import inspect

    import diffusers

    found = config.get("_class_name")
    if found and found != expected:
        return [f"{key} '{name}' is a config of {found} (its _class_name); this stage's denoiser is a {expected}"]
    if vae_config is None:
        return []
    defaults = inspect.signature(getattr(diffusers, expected).__init__).parameters
    latent = vae_config.get("latent_channels", 4)  # (AutoencoderKL's default)
    channels = {k: config.get(k, defaults[k].default) for k in ("in_channels", "out_channels")}
    channels["out_channels"] = channels["out_channels"] or channels["in_channels"]  # (SD3's None: as in_channels)
    wrong = {k: v for k, v in channels.items() if v != latent}
    if not wrong:
        return []
    said = ", ".join(f"{k} {v}" for k, v in wrong.items())
    return [f"{key} '{name}' has {said}, but the VAE's latent_channels is {latent}: the denoiser takes and returns "
            "the VAE's latents; use a VAE and a denoiser config with the same channels"]  # fmt: skip


def unet_config_problems(args: PipelineArguments, loaded_config=None) -> list[str]:
    """The UNet config (unet_config, or a pretrained pipeline's with another VAE) checked against the VAE and what
    this loop feeds it (`denoiser_config_problems`; no SDXL added conditions). `loaded_config`: the loaded UNet's
    `.config`, checked again after loading, since at check time a hub pipeline not yet downloaded has none at hand."""
    from hfgen.diffusion.flow_components import pipeline_config

    if args.unet_config:
        key, name, config = "unet_config", args.unet_config, read_config(args.unet_config)
    elif args.pretrained_model_name_or_path:
        key, name = "pretrained_model_name_or_path", args.pretrained_model_name_or_path
        config = pipeline_config(name, "unet/config.json")
    else:
        config = None
    if loaded_config is not None:
        config = dict(loaded_config)
    if not config:
        return []
    if added := config.get("addition_embed_type"):
        return [f"{key} '{name}': its UNet has addition_embed_type '{added}' (SDXL's added time/text conditions), "
                "which this stage does not feed (it passes no added_cond_kwargs); use an SD 1.x/2.x-style UNet "
                "(no addition_embed_type)"]  # fmt: skip
    vae = vae_config_of(args.vae_name_or_path, args.pretrained_model_name_or_path)
    if args.pretrained_model_name_or_path and not args.vae_name_or_path:
        vae = None  # a pipeline's own UNet and VAE go together
    return denoiser_config_problems(key, name, config, "UNet2DConditionModel", vae)


def read_config(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---- tokenizer and text encoder ----------------------------------------------------------------------


def build_caption_tokenizer(captions: list[str], max_length: int):
    """A CLIPTokenizer whose BPE merges are learned from `captions` until every caption word is one token. It
    splits text exactly as CLIP's does (its normalizer, regex and byte-level pre-tokenizer, `</w>` word ends), and
    its base vocabulary is CLIP's 512 byte symbols, so any text still tokenizes. The merges are learned here rather
    than by `tokenizers`' BpeTrainer, which breaks ties between equally frequent pairs differently from run to run:
    a re-run or a resumed run must see the same token ids."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # an empty CLIP tokenizer: its normalizer and pre-tokenizer define the splitting
    normalizer, pre_tokenizer = template.backend_tokenizer.normalizer, template.backend_tokenizer.pre_tokenizer
    word_counts = Counter(
        word for caption in captions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [template.bos_token, template.eos_token] + alphabet + [a + "</w>" for a in alphabet]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    words = {tuple(word[:-1]) + (word[-1] + "</w>",): count for word, count in sorted(word_counts.items())}
    merges = []
    while True:  # classic BPE: merge the most frequent adjacent pair (ties: the smallest pair) until none is left
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        words = {merge_pair(word, best): count for word, count in words.items()}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def tokenize(tokenizer, captions: list[str]):
    """Token ids padded to the tokenizer's length, exactly as StableDiffusionPipeline encodes prompts."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def load_tokenizer(name: str, revision: str | None = None, subfolder: str | None = None):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(name, revision=revision, subfolder=subfolder or "")
    except (OSError, ValueError) as error:
        raise UserError(f"tokenizer '{name}' could not be loaded: {str(error).splitlines()[0]}") from None


def build_text_encoder(config_path: str, tokenizer):
    """A randomly initialised CLIPTextModel sized by the config, with the tokenizer's vocabulary, ids and length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        **{
            **read_config(config_path),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,  # pooling looks for this id (not the legacy 2)
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    return CLIPTextModel(config)


# ---- image models and schedulers ----------------------------------------------------------------------


def build_unet(config_path: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(read_config(config_path))


def build_vae(config_path: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(read_config(config_path))


def load_vae(name: str, revision: str | None = None, subfolder: str | None = None, variant: str | None = None):
    """An AutoencoderKL from a dir holding one (a vae run), a pipeline dir/hub id (its `vae` subfolder), or a hub id;
    `variant`: the pipeline's weights variant (fp16), which applies to its VAE as to its other components."""
    from diffusers import AutoencoderKL

    path = Path(name)
    if subfolder is None and (path / "model_index.json").is_file():
        subfolder = "vae"
    try:
        return AutoencoderKL.from_pretrained(name, revision=revision, subfolder=subfolder, variant=variant)
    except (OSError, ValueError) as error:
        where = f"{name}/{subfolder}" if subfolder else name
        raise UserError(f"VAE '{where}' could not be loaded: {str(error).splitlines()[0]}") from None


def build_noise_scheduler(config_path: str | None):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(read_config(config_path) if config_path else SD_NOISE_SCHEDULE)


def load_components(args: PipelineArguments, train_captions: list[str]) -> dict:
    """tokenizer, text_encoder, vae, unet, noise_scheduler (training), sampler (saved with the pipeline) and
    base_sampler (the base pipeline's own, without the recipe's prediction_type)."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if args.pretrained_model_name_or_path:
        name, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        try:
            components = {
                "tokenizer": load_tokenizer(name, revision, subfolder="tokenizer"),
                "text_encoder": CLIPTextModel.from_pretrained(
                    name, subfolder="text_encoder", revision=revision, variant=variant
                ),
                "vae": load_vae(args.vae_name_or_path)
                if args.vae_name_or_path
                else load_vae(name, revision, subfolder="vae", variant=variant),
                "unet": UNet2DConditionModel.from_pretrained(
                    name, subfolder="unet", revision=revision, variant=variant
                ),
                "noise_scheduler": DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=revision),
                "sampler": pretrained_sampler(name, revision),
            }
        except (OSError, ValueError) as error:
            if problems := missing_component_problems(name):  # diffusers' message names the root only
                raise UserError("pretrained_model_name_or_path " + "; ".join(problems)) from None
            raise UserError(f"pipeline '{name}' could not be loaded: {str(error).splitlines()[0]}") from None
        # Checked again on the loaded UNet: `hfgen check` sees no config of a hub pipeline not yet downloaded, and an
        # SDXL UNet would otherwise fail inside diffusers at the first step, after the data (and DreamBooth's class
        # images) were made.
        if problems := unet_config_problems(args, components["unet"].config):
            raise UserError("; ".join(problems))
    else:
        if args.tokenizer_name == CAPTION_TOKENIZER:
            tokenizer = build_caption_tokenizer(train_captions, args.max_caption_tokens)
        else:
            tokenizer = load_tokenizer(args.tokenizer_name)
        noise_scheduler = build_noise_scheduler(args.scheduler_config)
        components = {
            "tokenizer": tokenizer,
            "text_encoder": build_text_encoder(args.text_encoder_config, tokenizer),
            "vae": load_vae(args.vae_name_or_path),
            "unet": build_unet(args.unet_config),
            "noise_scheduler": noise_scheduler,
            # DDIM with trailing timesteps: starts sampling from the last training timestep (Lin et al., 2024)
            "sampler": DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", steps_offset=1),
        }
    # The sampler as the base pipeline's users sample it (DreamBooth's class images come from the base)
    components["base_sampler"] = components["sampler"]
    if args.prediction_type:  # the saved sampler must read the UNet's output the way it was trained
        components["noise_scheduler"].register_to_config(prediction_type=args.prediction_type)
        sampler = components["sampler"]
        components["sampler"] = type(sampler).from_config(sampler.config, prediction_type=args.prediction_type)
    return components


def pretrained_sampler(name: str, revision: str | None):
    """The pretrained pipeline's own inference scheduler (its class is named in model_index.json), a diffusers
    scheduler only: the library named there was imported, and importing a module runs it (diffusers itself imports
    no other library a model_index.json names, and neither does hfgen without trust_remote_code)."""
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    library, class_name = DiffusionPipeline.load_config(name, revision=revision).get("scheduler") or (None, None)
    scheduler = getattr(diffusers, str(class_name), None) if library == "diffusers" else None
    if not (isinstance(scheduler, type) and issubclass(scheduler, SchedulerMixin)):
        raise UserError(
            f"pretrained_model_name_or_path '{name}': its model_index.json names the scheduler "
            f"{[library, class_name]}, which is not a diffusers scheduler; hfgen samples with diffusers' schedulers "
            "only (it does not import the other libraries a pipeline names)"
        )
    return scheduler.from_pretrained(name, subfolder="scheduler", revision=revision)


def make_pipeline(tokenizer, text_encoder, vae, unet, sampler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


class FrozenInHalf:
    """Frozen components (`models`: name -> VAE / text encoder of `args`' pipeline) cast to the mixed-precision
    `dtype`, which they compute in, and brought back by `restore` to their float32 weights as loaded, for the save
    (float32 on disk whatever the training precision, as the pretrained pipelines ship): casting back up would
    save every weight rounded to the half dtype, in float32 where nothing shows it (probe 43 C2). A component read
    from files is read again then, not held twice through the run (an SD3 T5 is 19 GB in float32); one built here
    (a text encoder from its config, pretrained contrastively: small by construction) keeps a float32 copy of its
    weights on the CPU."""

    def __init__(self, args, models: dict, dtype):
        import torch

        self.args, self.models, self.copies = args, models, {}
        self.cast = dtype != torch.float32
        if not self.cast:
            return
        for name, model in models.items():
            if not self.reads_again(name):
                self.copies[name] = {
                    key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()
                }
            model.to(dtype=dtype)  # (diffusers warns about any dtype cast, even a no-op one)

    def reads_again(self, name: str) -> bool:
        return bool(self.args.pretrained_model_name_or_path or (name == "vae" and self.args.vae_name_or_path))

    def read_again(self, name: str):
        """The component `name` as `load_components` / `load_flow_components` read it."""
        if name == "vae" and self.args.vae_name_or_path:
            return load_vae(self.args.vae_name_or_path)
        cls, source = type(self.models[name]), self.args.pretrained_model_name_or_path
        found = dict(subfolder=name, revision=self.args.revision)
        try:
            return cls.from_pretrained(source, **found, variant=self.args.variant)
        except (OSError, ValueError):
            if self.args.variant is None:
                raise
            # a whole pipeline (t2i_flow's) loads a component that lacks the variant's files from its plain ones
            return cls.from_pretrained(source, **found)

    def restore(self) -> None:
        """Every frozen component back in float32, in place (the run's last grid renders with it), with its weights
        as loaded."""
        import torch

        if not self.cast:
            return
        for name, model in self.models.items():
            weights = self.copies.pop(name) if name in self.copies else self.read_again(name).state_dict()
            model.to(dtype=torch.float32)
            model.load_state_dict(weights)
        self.cast = False


# ---- reading pipeline dirs ------------------------------------------------------------------------------


def lora_run_as_base_problems(name: str) -> list[str]:
    """An image LoRA run given as the pipeline a stage starts from (t2i, t2i_flow): its adapters, not a pipeline,
    whose weights would be lost; told how to start from them (before, t2i_flow called it a directory without a
    config.json)."""
    if not (base := lora_run_base(name)):
        return []
    base = base["pretrained_model_name_or_path"]
    return [
        f"pretrained_model_name_or_path '{name}' is a LoRA run (adapters for the pipeline '{base}'), not a "
        f"pipeline: fuse them into one with `hfgen merge {name} --output_dir MERGED_DIR` and start from "
        f"MERGED_DIR, or start from '{base}'"
    ]


def lora_run_base(path: str | Path) -> dict | None:
    """The base pipeline a t2i / t2i_flow LoRA run's adapters belong on (its lora_base.json: name, revision,
    variant, pipeline_changes), or None if `path` is not such a run. A user writes one beside a diffusers LoRA
    (`diffusers_lora_problem`): one that names no base is refused, naming the file."""
    base_file = Path(path) / LORA_BASE
    if not base_file.is_file():
        return None
    try:
        base = json.loads(base_file.read_text(encoding="utf-8"))
    except ValueError:
        base = None
    if not isinstance(base, dict) or not isinstance(base.get("pretrained_model_name_or_path"), str):
        raise UserError(
            f"'{base_file}' names no base pipeline: it must be a JSON object whose pretrained_model_name_or_path is "
            'the pipeline dir or hub id the LoRA belongs on, e.g. {"pretrained_model_name_or_path": "outputs/t2i"}'
        )
    return base


def diffusers_lora_problem(path: Path) -> str | None:
    """A LoRA that diffusers' `save_lora_weights` saved (as its training scripts do: pytorch_lora_weights.safetensors)
    without the lora_base.json that names its base pipeline, in words that say what hfgen needs to take it (it was
    told it had no config.json or adapter_config.json); None for anything else: a dir that holds a model beside the
    file (a pipeline a diffusers script saved into its LoRA's output_dir) or an hfgen run (one interrupted between
    its LoRA file and its lora_base.json is told it is unfinished)."""
    beside = (LORA_BASE, "model_index.json", "config.json", "adapter_config.json", "recipe.yaml")
    if not (path / LORA_WEIGHTS).is_file() or any((path / name).is_file() for name in beside):
        return None
    return (
        f"is a diffusers LoRA ({LORA_WEIGHTS}), which names no base pipeline: hfgen loads one onto the base named in "
        f'a {LORA_BASE} beside it, as its t2i LoRA runs write it; write {{"pretrained_model_name_or_path": "BASE"}} '
        f"into '{path / LORA_BASE}' (BASE: the pipeline dir or hub id the LoRA was trained on), and hfgen generate, "
        "eval and merge take the dir (a stage starts from its merge)"
    )


def is_pipeline_dir(path: str | Path) -> bool:
    """A diffusers pipeline dir (model_index.json) or a LoRA run of the t2i stage (adapter + its base's name)."""
    path = Path(path)
    return (path / "model_index.json").is_file() or ((path / LORA_WEIGHTS).is_file() and (path / LORA_BASE).is_file())


def load_pipeline(path: str | Path, device: str | None = None, dtype=None):
    """DiffusionPipeline.from_pretrained(path), or for a LoRA run its base pipeline with the adapter loaded."""
    import torch
    from diffusers import DiffusionPipeline

    path = Path(path)
    if not is_pipeline_dir(path):
        raise UserError(f"'{path}' is not a diffusers pipeline dir (no model_index.json) nor a t2i LoRA run")
    try:
        if (path / "model_index.json").is_file():
            pipeline = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, **absent_components(path))
        else:
            from hfgen.models import looks_local, recorded_base_problem
            from hfgen.tracking import base_changed_problem

            base = lora_run_base(path)
            base_name = base["pretrained_model_name_or_path"]
            # a local base that is gone first: it holds no run either, which was told as a base trained again in
            # place (a hub id is left to from_pretrained, with the revision the run recorded)
            gone = looks_local(base_name) and recorded_base_problem(
                path / LORA_BASE, "pretrained_model_name_or_path", base_name
            )
            if problem := gone or base_changed_problem(path, base_name, "pretrained_model_name_or_path"):
                raise UserError(problem + ".")
            changes = base.get("pipeline_changes", {})
            left_out = {name: None for name in changes.get("absent", [])}  # e.g. drop_t5's T5
            pipeline = DiffusionPipeline.from_pretrained(
                base_name, revision=base.get("revision"), variant=base.get("variant"), torch_dtype=dtype,
                **absent_components(base_name) | left_out,
            )  # fmt: skip
            apply_pipeline_changes(pipeline, changes, dtype)
            pipeline.load_lora_weights(str(path))
    except (OSError, ValueError) as error:
        if problems := missing_component_problems(str(path)):  # diffusers' message names the root only
            raise UserError("pipeline " + "; ".join(problems)) from None
        raise UserError(f"pipeline '{path}' could not be loaded: {str(error).splitlines()[0]}") from None
    if "transformer" in pipeline.components and getattr(pipeline.vae.config, "shift_factor", 0.0) is None:
        # SD3's and Flux's pipelines decode latents / scaling_factor + shift_factor: a TypeError at the first image
        raise UserError(
            f"pipeline '{path}': its VAE's config has no shift_factor, which {type(pipeline).__name__} needs to "
            "decode; a t2i_flow run on it sets the VAE's latent factors and saves them (a full run in its vae/, a "
            "LoRA run in lora_base.json)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def pipeline_changes(
    model_args, vae, scheduler_changes: dict, absent: tuple[str, ...] = (), latent_factors: bool = False
) -> dict:
    """What a LoRA run's recipe changed in its base pipeline, for lora_base.json's `pipeline_changes`: the
    scheduler's config keys it set (`scheduler_changes`: prediction_type; a flow run's shift), the VAE it swapped in
    (`vae_name_or_path`, with the latent shift/scaling factors the run used: a flow run sets them on a VAE trained
    here), the base VAE's latent factors when the run may have set them (`latent_factors`: a flow run on a base whose
    VAE had none), and the components it left out (`absent`: drop_t5's T5). The adapters were trained on, and
    validated with, that pipeline: `load_pipeline` rebuilds it (stock `load_lora_weights` on the base does not)."""
    from hfgen.finetune import resolved

    changes = {}
    if scheduler_changes:
        changes["scheduler"] = scheduler_changes
    factors = {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}
    if model_args.vae_name_or_path:
        changes["vae"] = {"name_or_path": resolved(model_args.vae_name_or_path), **factors}
    elif latent_factors:
        changes["vae"] = factors
    if absent:
        changes["absent"] = list(absent)
    return changes


def apply_pipeline_changes(pipeline, changes: dict, dtype=None) -> None:
    """A loaded base pipeline changed as its LoRA run's recipe changed it (see `pipeline_changes`; the absent
    components are left out at loading)."""
    if scheduler := changes.get("scheduler"):
        pipeline.register_modules(
            scheduler=type(pipeline.scheduler).from_config(pipeline.scheduler.config, **scheduler)
        )
    if (vae := changes.get("vae")) and "name_or_path" not in vae:  # the base's own VAE, with the run's factors
        pipeline.vae.register_to_config(scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"])
    elif vae:
        swapped = load_vae(vae["name_or_path"])
        swapped.register_to_config(scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"])
        pipeline.register_modules(vae=swapped.to(dtype=dtype) if dtype is not None else swapped)


def absent_components(path: str | Path) -> dict:
    """{name: None} for the components a local pipeline dir saved as absent (model_index.json `[null, null]`), e.g.
    the T5 encoder of an SD3 pipeline trained without it: diffusers only loads such a dir when told so."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    return {
        name: None for name, value in json.loads(index.read_text(encoding="utf-8")).items() if value == [None, None]
    }


def patch_discriminator(in_channels: int = 3, channels: int = 64, downsamplings: int = 2):
    """PatchGAN (Isola et al., 2017): strided convolutions down to a map of real/fake logits, one per overlapping
    patch of the image."""
    import torch

    layers, width = [], in_channels
    for i in range(downsamplings):
        layers += [torch.nn.Conv2d(width, channels * 2**i, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
        width = channels * 2**i
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(width, 1, 3, padding=1))
