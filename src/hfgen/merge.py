"""Merge a LoRA adapter into its base model: `hfgen merge ADAPTER_DIR --output_dir MERGED_DIR`.

ADAPTER_DIR is a causal-LM adapter (or a t2i / t2i_flow LoRA run, whose adapters are fused into its base pipeline:
MERGED_DIR is then a plain diffusers pipeline dir), e.g. the output of `sft` with `use_peft: true` (adapter_config.json naming
its base, adapter_model.safetensors, tokenizer). MERGED_DIR receives a plain model (safetensors, config,
generation config) and the tokenizer: it loads with `AutoModelForCausalLM.from_pretrained` without peft, and
serves wherever a full model does (PPO's policy and reference, other tools, `hfgen generate MERGED_DIR --chat`).
The merge is W + (alpha/r)·B·A per adapted layer, so the merged model computes what base+adapter computes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument(
        "adapter",
        type=expand_home,
        help="LoRA run dir: a causal-LM adapter (e.g. outputs/tiny/sft_lora) or a t2i/t2i_flow LoRA run",
    )
    parser.add_argument("--output_dir", required=True, type=expand_home, help="where the merged model and tokenizer go")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: the base's)",
    )


def main(args: argparse.Namespace) -> int:
    from hfgen import guard, tracking
    from hfgen.diffusion.components import lora_run_base
    from hfgen.errors import UserError
    from hfgen.hub_cache import cached_snapshot
    from hfgen.models import not_a_model_dir

    adapter, output_dir = Path(args.adapter), Path(args.output_dir)
    if output_dir.resolve() == adapter.resolve():
        raise UserError("--output_dir must differ from the adapter dir.")
    if problem := tracking.path_problem(output_dir, "--output_dir", directory=True):
        raise UserError(problem + ".")
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "merged_from.json").is_file():
        raise UserError(
            f"--output_dir '{output_dir}' holds other files; give a new or empty dir (or an earlier merge's)."
        )
    if problem := not_a_model_dir(adapter):  # a run killed before its final save holds a partial adapter, or none
        raise UserError(f"'{adapter}' {problem}.")
    run_recipe = {}
    if pipeline_base := lora_run_base(adapter):
        from hfgen.evaluation.images import recipe_of

        save, base = fused_pipeline(adapter, args.dtype), pipeline_base["pretrained_model_name_or_path"]
        # the run's recipe goes along: what its samples need (resolution, max_sequence_length) and what `hfgen eval`
        # reads (validation prompts, digits), as `recipe_of` finds it on the run (a recipe.yaml would make the dir
        # look like a run)
        run_recipe = {"recipe": recipe_of(adapter)}
    else:
        from hfgen.generate import trained_on_chat

        save, base = merged_causal_lm(adapter, args.dtype)
        # how the adapter's run prompted its model, kept with the merge: the run dir is often moved or deleted once
        # merged, and a model trained on raw prompts would then be prompted in the chat template
        if (chat := trained_on_chat(str(adapter))) is not None:
            run_recipe = {"trained_on_chat": chat}

    # a hub base: the snapshot it resolved to (the adapter's pair check refused another one than its run trained on)
    snapshot = cached_snapshot(base, (pipeline_base or {}).get("revision"))
    base_snapshot = {"base_commit": snapshot.name} if snapshot is not None else {}
    # Written beside, then moved into place: a merge killed half-way leaves no dir that looks like a model.
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tracking.remove_deletion_leftovers(output_dir.parent, of=output_dir.name)  # an earlier merge killed mid-delete
    try:
        save(partial)
        tracking.weights_readable_as_umask(partial)
        guard.kill_point("merge_save")
        tracking.write_json(
            partial / "merged_from.json",
            {
                "adapter": str(adapter.resolve()),
                "base": base,
                **base_snapshot,
                "packages": tracking.package_versions(),
                **run_recipe,
            },  # fmt: skip
        )
    except BaseException:  # a full disk, Ctrl-C: the half-written weights would hold the disk's space for nothing
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # empty, or an earlier merge's (checked above): renamed away first, so a kill half way through deleting it never
    # leaves half an earlier merge that its merged_from.json still presents as a model
    tracking.remove_dir(output_dir)
    partial.rename(output_dir)
    print(output_dir)
    return 0


def merged_causal_lm(adapter: Path, dtype: str):
    """(save(dir): the merged model and the adapter's tokenizer, the base's name) for a causal-LM adapter dir."""
    from hfgen.errors import UserError
    from hfgen.models import (
        adapter_base,
        adapter_base_problems,
        hub_dir_problem,
        load_causal_lm,
        load_tokenizer,
        name_special_tokens,
        refuse_tied_embedding_merge,
    )

    config_path = adapter / "adapter_config.json"
    if not config_path.exists() and (problem := hub_dir_problem("ADAPTER", str(adapter))):
        raise UserError(problem + ".")
    if not config_path.is_file():
        raise UserError(
            f"'{adapter}' is not a LoRA adapter dir (no adapter_config.json); hfgen merge takes the output of a LoRA run."
        )
    task_type = json.loads(config_path.read_text(encoding="utf-8")).get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise UserError(
            f"'{adapter}' is a {task_type} adapter; hfgen merge handles causal-LM adapters (reward runs save merged models already)."
        )
    base = adapter_base(adapter)
    if problems := adapter_base_problems(adapter):
        raise UserError(problems[0] + ".")
    model = load_causal_lm(str(adapter), dtype)
    refuse_tied_embedding_merge(model, f"'{adapter}'")
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
    tokenizer = load_tokenizer(str(adapter))
    if (adapter / "generation_config.json").is_file():  # the run's (an SFT LoRA run saves it), not the base's
        from transformers import GenerationConfig

        merged.generation_config = GenerationConfig.from_pretrained(adapter)
    name_special_tokens(merged, tokenizer)  # the adapter's tokenizer's pad and EOS, as a full run's dir has them

    def save(directory: Path) -> None:
        merged.save_pretrained(directory)  # safetensors
        tokenizer.save_pretrained(directory)

    return save, base


def fused_pipeline(adapter: Path, dtype: str):
    """save(dir): the base pipeline with the LoRA weights fused in, for a t2i or t2i_flow LoRA run (its adapters
    and lora_base.json): a plain diffusers pipeline dir, loadable without peft."""
    import torch

    from hfgen.diffusion.components import load_pipeline

    pipeline = load_pipeline(adapter, device="cpu", dtype=None if dtype == "auto" else getattr(torch, dtype))
    pipeline.fuse_lora()  # every component the adapters were trained on (UNet or transformer, text encoders)
    pipeline.unload_lora_weights()  # the LoRA layers go, the fused weights stay
    from hfgen.diffusion.image_stage import record_sample_size
    from hfgen.evaluation.images import recipe_of

    # the trained size as the denoiser's default, as a full run saves it (plain diffusers renders sample_size x the
    # VAE's factor: the base's size otherwise)
    if resolution := (recipe_of(adapter) or {}).get("resolution"):
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        record_sample_size(denoiser, resolution, pipeline.vae)
    return lambda directory: pipeline.save_pretrained(directory, safe_serialization=True)
