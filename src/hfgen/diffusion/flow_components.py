"""The parts of a flow-matching text-to-image pipeline in the Stable Diffusion 3 layout, built from configs or
loaded from a pretrained pipeline.

    tokenizer, tokenizer_2          CLIPTokenizers (from scratch: one `embedded:caption-bpe` tokenizer, used twice)
    text_encoder, text_encoder_2    CLIPTextModelWithProjection: SD3 reads their penultimate hidden states
                                    (sequence) and projected pooled embeddings; frozen, their outputs cached
    text_encoder_3, tokenizer_3     T5 (SD3) or None: SD3 then uses zeros in its place (`drop_t5` drops a loaded one)
    vae                             AutoencoderKL (16 latent channels), a `vae` stage run from scratch
    transformer                     SD3Transformer2DModel (MMDiT), from a JSON config from scratch
    scheduler                       FlowMatchEulerDiscreteScheduler, for training and sampling (its `shift`)

`make_pipeline` assembles a StableDiffusion3Pipeline, so the saved dir loads with DiffusionPipeline.from_pretrained.
A pretrained FluxPipeline (Flux.1: CLIP pooled + T5 sequence, FluxTransformer2DModel) is fine-tuned the same way:
`predict_velocity` hides the two layouts' differences from the stage's loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hfgen.diffusion.components import CAPTION_TOKENIZER, read_config
from hfgen.errors import UserError
from hfgen.models import check_config_file, check_model_source

SCRATCH_SHIFT = 3.0  # SD3's sigma-schedule shift: the default of a pipeline built from scratch


@dataclass
class FlowPipelineArguments:
    """Which pipeline the t2i_flow stage starts from: a pretrained SD3-layout one, or components from configs."""

    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A diffusers SD3 or Flux pipeline to fine-tune: hub id (e.g. "
                  "stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev) or local dir (an earlier "
                  "t2i_flow run's output_dir)."},
    )  # fmt: skip
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the pretrained pipeline."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant of the pretrained pipeline."})
    drop_t5: bool = field(
        default=False, metadata={"help": "Leave out the T5 text encoder of a pretrained pipeline (SD3 allows it)."}
    )
    transformer_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: SD3Transformer2DModel config JSON (recipes/tiny/mmdit_digits.json)."},
    )
    vae_name_or_path: str | None = field(
        default=None, metadata={"help": "From scratch: an AutoencoderKL dir (a `vae` stage's output_dir) or hub id."}
    )
    text_encoder_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: CLIPTextConfig JSON of both CLIP text encoders (with projection_dim)."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": f"From scratch: a CLIPTokenizer dir or hub id, or '{CAPTION_TOKENIZER}' (BPE learned here)."},
    )
    text_encoder_pretraining_steps: int = field(
        default=0, metadata={"help": "From scratch: CLIP contrastive pretraining steps of each new text encoder."}
    )
    max_caption_tokens: int = field(default=16, metadata={"help": f"Token length of '{CAPTION_TOKENIZER}' captions."})
    shift: float | None = field(
        default=None, metadata={"help": f"Shift of the sigma schedule when built from scratch (default {SCRATCH_SHIFT}, "
                                        "SD3's); a pretrained pipeline keeps its scheduler's unless override_shift."}
    )  # fmt: skip
    override_shift: bool = field(
        default=False,
        metadata={"help": "Apply `shift` to a pretrained pipeline's scheduler, as a static shift at training and "
                  "sampling: a Flux scheduler's dynamic shifting (the shift picked from the image size, which "
                  "ignores `shift`) goes off."},
    )  # fmt: skip
    training_guidance_scale: float = field(
        default=3.5,
        metadata={"help": "The guidance input of a guidance-distilled transformer (Flux.1-dev: `guidance_embeds`) "
                  "during training (diffusers' train_dreambooth_lora_flux.py --guidance_scale); unused otherwise. "
                  "At sampling, such a pipeline takes `guidance_scale` as that input."},
    )  # fmt: skip
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "T5 tokens of the prompt embedding, at training and sampling (the pipeline's argument; "
                  "default: the pipeline's, 256 for SD3, 512 for Flux). An SD3 pipeline without T5 puts that many "
                  "zero tokens after the CLIP ones: a tiny one trains ~10x faster with 0 (then sampled with "
                  "max_sequence_length=0; hfgen generate and eval read it from the run's recipe.yaml)."},
    )  # fmt: skip


FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")  # the layouts this stage's loop feeds
FROM_SCRATCH_KEYS = ("transformer_config", "vae_name_or_path", "text_encoder_config", "tokenizer_name")


def check_flow_pipeline_arguments(args: FlowPipelineArguments) -> list[str]:
    problems = []
    if args.pretrained_model_name_or_path:
        scratch = [k for k in ("transformer_config", "text_encoder_config", "tokenizer_name") if getattr(args, k)]
        if scratch:
            problems.append(
                f"{', '.join(scratch)} build a pipeline from scratch; drop them or pretrained_model_name_or_path"
            )
        if args.text_encoder_pretraining_steps:
            problems.append("text_encoder_pretraining_steps pretrains text encoders built from scratch; drop it")
        problems += flow_base_problems(args)
    else:
        missing = [k for k in FROM_SCRATCH_KEYS if not getattr(args, k)]
        if missing:
            problems.append(
                "set pretrained_model_name_or_path (fine-tune a pipeline), or build one from scratch with "
                f"{', '.join(FROM_SCRATCH_KEYS)} (missing: {', '.join(missing)})"
            )
    for key in ("transformer_config", "text_encoder_config"):
        problems += check_config_file(key, getattr(args, key))
    problems += check_model_source("vae_name_or_path", args.vae_name_or_path, hint="train one with the vae stage first")
    if args.tokenizer_name != CAPTION_TOKENIZER:
        problems += check_model_source("tokenizer_name", args.tokenizer_name)
    if args.shift is not None and args.shift <= 0:
        problems.append(f"shift must be positive, got {args.shift}")
    if args.pretrained_model_name_or_path and args.shift is not None and not args.override_shift:
        problems.append(f"shift {args.shift} is not applied to a pretrained pipeline, which keeps its scheduler's: "
                        "set override_shift: true to apply it (a static shift), or drop shift")  # fmt: skip
    if args.override_shift and (args.shift is None or not args.pretrained_model_name_or_path):
        problems.append("override_shift applies `shift` to a pretrained pipeline's scheduler: set both "
                        "pretrained_model_name_or_path and shift, or drop override_shift")  # fmt: skip
    if args.max_sequence_length is not None and not 0 <= args.max_sequence_length <= 512:  # the pipelines' bound
        problems.append(f"max_sequence_length must be in [0, 512], got {args.max_sequence_length}")
    if problems:
        return problems
    return transformer_config_problems(args)


def flow_base_problems(args: FlowPipelineArguments) -> list[str]:
    """The pretrained pipeline: there, of a class this stage trains (`components.pipeline_class_problems`), and not
    a Flux one with drop_t5; read from its model_index.json before anything loads (a hub id not yet downloaded is
    checked again at load, `load_flow_components`)."""
    from hfgen.diffusion.components import (
        lora_run_as_base_problems,
        missing_component_problems,
        pipeline_class_problems,
    )

    name = args.pretrained_model_name_or_path
    problems = (
        lora_run_as_base_problems(name)
        or check_model_source("pretrained_model_name_or_path", name)
        or pipeline_class_problems(name, "t2i_flow")
        or [f"pretrained_model_name_or_path {problem}" for problem in missing_component_problems(name)]
    )
    if problems:
        return problems
    if args.drop_t5 and (pipeline_config(name, "model_index.json") or {}).get("_class_name") == "FluxPipeline":
        problems.append(DROP_T5_FLUX)
    return problems + training_guidance_problems(args, pipeline_config(name, "transformer/config.json"))


def training_guidance_problems(args: FlowPipelineArguments, transformer_config) -> list[str]:
    """An explicitly set training_guidance_scale (another than the default) for a transformer without
    `guidance_embeds` (SD3's, or a Flux one that is not guidance-distilled, as Flux.1-schnell), which takes no
    guidance input: it was ignored."""
    default = FlowPipelineArguments.training_guidance_scale
    if args.training_guidance_scale == default or not transformer_config:
        return []
    if transformer_config.get("guidance_embeds"):
        return []
    if is_flux_config(transformer_config):
        whose = (f"the pretrained Flux pipeline '{args.pretrained_model_name_or_path}' is not guidance-distilled (its "
                 "transformer has no guidance_embeds, as Flux.1-schnell)")  # fmt: skip
    else:  # (SD3's transformer has no guidance input at all; predict_velocity passes none)
        source = args.pretrained_model_name_or_path or args.transformer_config
        whose = (f"the transformer of '{source}' is an SD3 one, which has no guidance input (only guidance-distilled "
                 "Flux, with guidance_embeds, has one)")  # fmt: skip
    return [f"training_guidance_scale {args.training_guidance_scale}: {whose} and takes no guidance input, in "
            "training or sampling; drop training_guidance_scale"]  # fmt: skip


DROP_T5_FLUX = ("drop_t5: the pretrained pipeline is a FluxPipeline, which conditions on the T5 sequence embeddings "
                "and cannot drop its T5 encoder (SD3 can); drop drop_t5")  # fmt: skip


def transformer_config_problems(args: FlowPipelineArguments) -> list[str]:
    """The transformer config (transformer_config, or a pretrained SD3 pipeline's with another VAE) checked against
    the VAE (`components.denoiser_config_problems`); Flux's packs 2x2 latents into its in_channels: not compared."""
    from hfgen.diffusion.components import denoiser_config_problems, vae_config_of

    if args.transformer_config:
        key, name, config = "transformer_config", args.transformer_config, read_config(args.transformer_config)
        if problems := training_guidance_problems(args, config):
            return problems
    elif args.pretrained_model_name_or_path and args.vae_name_or_path:
        key, name = "pretrained_model_name_or_path", args.pretrained_model_name_or_path
        config = pipeline_config(name, "transformer/config.json")
        if not config or is_flux_config(config):
            return []
    else:
        return []
    vae = vae_config_of(args.vae_name_or_path, args.pretrained_model_name_or_path)
    return denoiser_config_problems(key, name, config, "SD3Transformer2DModel", vae)


def is_flux_config(transformer_config) -> bool:
    """Whether a transformer config (a saved config.json's, or a loaded model's `.config`) is Flux's."""
    return transformer_config.get("_class_name") == "FluxTransformer2DModel"


def latent_multiple(vae_config, transformer_config) -> int:
    """What every image side must be a multiple of: the VAE's downsampling times the transformer's patch (Flux: its
    2x2 latent packing, whatever its config's patch_size of 1 says)."""
    patch = 2 if is_flux_config(transformer_config) else transformer_config.get("patch_size", 2)  # (SD3's default)
    return 2 ** (len(vae_config["block_out_channels"]) - 1) * patch


def pipeline_config(name: str, filename: str) -> dict | None:
    """A config file (`filename` in the dir or repo `name`; "": `name` is the file) of a local dir or of a hub repo
    already in the cache; None where it is not there (a check downloads nothing)."""
    import json
    from pathlib import Path

    path = Path(name).expanduser() / filename
    if not path.is_file() and filename:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, filename)
        except ValueError:  # not a repo id either: check_model_source names the key
            return None
        path = Path(cached) if isinstance(cached, str) else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None


def size_problems(args: FlowPipelineArguments, data_args) -> list[str]:
    """`resolution` or an `aspect_ratio_buckets` size whose sides are not multiples of `latent_multiple`, read from
    the configs before anything loads (skipped where a config is not at hand: a hub pipeline not yet downloaded)."""
    from hfgen.diffusion.buckets import sizes_off_multiple

    pretrained = args.pretrained_model_name_or_path
    if pretrained:
        transformer = pipeline_config(pretrained, "transformer/config.json")
    else:
        transformer = pipeline_config(args.transformer_config, "") if args.transformer_config else None
    vae_source = args.vae_name_or_path or pretrained  # a VAE dir or hub id, or a pipeline's `vae` subfolder
    vae = vae_source and (pipeline_config(vae_source, "config.json") or pipeline_config(vae_source, "vae/config.json"))
    if not transformer or not vae or "block_out_channels" not in vae:
        return []
    multiple = latent_multiple(vae, transformer)
    layout = "Flux's 2x2 latent packing" if is_flux_config(transformer) else "patches"
    why = f"which this pipeline needs (VAE downsampling x {layout})"
    problems = []
    if data_args.resolution % multiple:
        problems.append(f"resolution {data_args.resolution} is not a multiple of {multiple}, {why}")
    if odd := sizes_off_multiple(data_args.aspect_ratio_buckets, multiple):
        problems.append(f"aspect_ratio_buckets: sizes {odd} are not multiples of {multiple}, {why}")
    return problems


def load_flow_components(args: FlowPipelineArguments, train_captions: list[str]) -> dict:
    """The StableDiffusion3Pipeline components (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from hfgen.diffusion.components import absent_components, build_caption_tokenizer, load_tokenizer, load_vae

    if args.pretrained_model_name_or_path:
        from diffusers import DiffusionPipeline

        name = args.pretrained_model_name_or_path
        drop = absent_components(name) | ({"text_encoder_3": None, "tokenizer_3": None} if args.drop_t5 else {})
        try:
            pipeline = DiffusionPipeline.from_pretrained(name, revision=args.revision, variant=args.variant, **drop)
        except (OSError, ValueError) as error:
            raise UserError(f"pipeline '{name}' could not be loaded: {str(error).splitlines()[0]}") from None
        if type(pipeline).__name__ not in FLOW_PIPELINES:
            raise UserError(
                f"pretrained_model_name_or_path '{name}' is a {type(pipeline).__name__}; the t2i_flow stage trains "
                f"{' and '.join(FLOW_PIPELINES)} pipelines (SD3, SD3.5, Flux.1)"
            )
        if args.drop_t5 and type(pipeline).__name__ == "FluxPipeline":
            raise UserError(DROP_T5_FLUX)
        # (again on the loaded transformer: at check, a hub pipeline not yet downloaded had no config at hand)
        if problems := training_guidance_problems(args, pipeline.transformer.config):
            raise UserError(problems[0])
        parts = dict(pipeline.components)
        parts["base_scheduler"] = parts["scheduler"]  # the base's own sampling (DreamBooth's class images)
        if args.vae_name_or_path:
            parts["vae"] = load_vae(args.vae_name_or_path)
        if args.override_shift:
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(
                parts["scheduler"].config, **scheduler_changes(args)
            )
        return parts
    if args.tokenizer_name == CAPTION_TOKENIZER:
        tokenizer = build_caption_tokenizer(train_captions, args.max_caption_tokens)
    else:
        tokenizer = load_tokenizer(args.tokenizer_name)
    config = CLIPTextConfig(
        **{
            **read_config(args.text_encoder_config),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "tokenizer_3": None,
        "text_encoder": CLIPTextModelWithProjection(config),
        "text_encoder_2": CLIPTextModelWithProjection(config),
        "text_encoder_3": None,
        "vae": load_vae(args.vae_name_or_path),
        "transformer": SD3Transformer2DModel.from_config(read_config(args.transformer_config)),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=SCRATCH_SHIFT if args.shift is None else args.shift),
    }


def scheduler_changes(args: FlowPipelineArguments) -> dict:
    """The scheduler config keys `override_shift` sets on a pretrained pipeline's scheduler: its `shift`, static
    (a Flux scheduler's `use_dynamic_shifting`, which picks the shift from the image size and ignores `shift`, goes
    off), at training and sampling alike."""
    return {"shift": args.shift, "use_dynamic_shifting": False} if args.override_shift else {}


def base_parts(args: FlowPipelineArguments, parts: dict) -> dict:
    """The parts of the pipeline as it was before training, as its users sample it: a pretrained base with its own
    scheduler and VAE, not the recipe's override_shift / vae_name_or_path (drop_t5 stays: its T5 is not loaded)."""
    if not args.pretrained_model_name_or_path:
        return parts
    from hfgen.diffusion.components import load_vae

    vae = (
        load_vae(args.pretrained_model_name_or_path, args.revision, subfolder="vae", variant=args.variant)
        if args.vae_name_or_path
        else None
    )
    return {**parts, "scheduler": parts["base_scheduler"], "vae": vae or parts["vae"]}


def lora_pipeline_changes(args: FlowPipelineArguments, parts: dict) -> dict:
    """lora_base.json's `pipeline_changes` of a t2i_flow LoRA run (`components.pipeline_changes`)."""
    from hfgen.diffusion.components import pipeline_changes

    absent = ("text_encoder_3", "tokenizer_3") if args.drop_t5 else ()
    # the VAE's latent factors too when the run set them on a base VAE that had none (`set_latent_normalisation`)
    latent_factors = parts.get("latent_factors_set", False)
    return pipeline_changes(args, parts["vae"], scheduler_changes(args), absent, latent_factors=latent_factors)


def is_flux(parts: dict) -> bool:
    """Flux layout (CLIP pooled + T5 sequence, packed latents, position ids, guidance embedding) or SD3's."""
    return type(parts["transformer"]).__name__ == "FluxTransformer2DModel"


def make_pipeline(parts: dict, transformer=None):
    """A StableDiffusion3Pipeline or FluxPipeline of `parts` (with `transformer` in place of parts' one when given)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    transformer = transformer or parts["transformer"]
    if is_flux(parts):
        names = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler")
        return FluxPipeline(transformer=transformer, **{n: parts[n] for n in names})
    names = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
             "scheduler")  # fmt: skip
    return StableDiffusion3Pipeline(transformer=transformer, **{n: parts.get(n) for n in names})


def predict_velocity(transformer, config, latents, timesteps, states, pooled, guidance_scale: float):
    """The velocity the transformer (of `config`) predicts for noisy `latents` (batch, channels, height, width) at
    the schedule's `timesteps` (0-1000), in the latents' layout. Flux takes 2x2-packed latent tokens with their
    (0, row, column) ids, zero text ids, timesteps in [0, 1] and, when guidance-distilled (`guidance_embeds`),
    `guidance_scale` as an input: as diffusers' train_dreambooth_lora_flux.py and FluxPipeline feed it."""
    if config["_class_name"] != "FluxTransformer2DModel":
        return transformer(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=states, pooled_projections=pooled,
            return_dict=False,
        )[0]  # fmt: skip
    import torch
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    guidance = torch.full((batch,), guidance_scale, device=latents.device) if config["guidance_embeds"] else None
    velocity = transformer(
        hidden_states=FluxPipeline._pack_latents(latents, batch, channels, height, width),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype),
        txt_ids=torch.zeros(states.shape[1], 3, device=latents.device, dtype=latents.dtype),
        timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled, encoder_hidden_states=states,
        return_dict=False,
    )[0]  # fmt: skip
    return FluxPipeline._unpack_latents(velocity, height, width, vae_scale_factor=1)


def sampling_arguments(args: FlowPipelineArguments, data_args, parts: dict) -> dict:
    """Pipeline-call arguments that sampling needs to match training: the T5 length when set, and the training
    resolution (Flux's pipeline renders 1024 px unless told, SD3's the base transformer's sample_size)."""
    sampling = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}
    return {**sampling, "height": data_args.resolution, "width": data_args.resolution}


def set_latent_normalisation(vae, latent_means) -> None:
    """A VAE trained here has no `shift_factor`/`scaling_factor` for its latents: set them, as SD3 did for its VAE,
    so the transformer sees latents of mean 0 and unit variance (the pipeline applies them when decoding)."""
    import torch

    means = torch.as_tensor(latent_means).float()
    vae.register_to_config(shift_factor=means.mean().item(), scaling_factor=1.0 / means.std().item())
