"""Text-to-image diffusion on diffusers: pipeline components, image data, rendering.

    components.py  tokenizer / text encoder / VAE / UNet / schedulers, built from configs or loaded; pipeline dirs
    data.py        image-caption datasets (hub, imagefolder, embedded:digits), checks, transforms
    latents.py     the t2i stage's inputs: latents cached from a frozen VAE, or pixels and token ids
    rendering.py   images from a pipeline: PNGs and a grid (`hfgen generate PIPELINE_DIR --prompt ...`)
    text_pretraining.py  CLIP-style contrastive pretraining of a text encoder built from scratch
    training.py    what the t2i and vae stages share: loop arguments, accelerator, optimizer, resume, RNG

The stages themselves are hfgen/stages/t2i.py and hfgen/stages/vae.py; image metrics are
hfgen/evaluation/images.py. Heavy libraries are imported inside functions, so importing this package is cheap.
"""

from hfgen.diffusion.components import is_pipeline_dir, load_pipeline
from hfgen.diffusion.rendering import render_images

__all__ = ["is_pipeline_dir", "load_pipeline", "render_images"]
