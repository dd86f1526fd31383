"""Training inputs of the t2i stage: latents cached once from a frozen VAE (with caption indices), or pixels and
token ids prepared on the fly. Also used by scripts/bench_t2i.py, so both train on the same pre-encoded data."""

from __future__ import annotations

import torch

from hfgen.diffusion.components import tokenize
from hfgen.diffusion.data import pick_caption, pixel_transform, undecoded


class CachedLatents(torch.utils.data.Dataset):
    """Per image: the VAE posterior's mean and std (and the flipped image's), and its caption's index. Batches
    are gathered in one indexing per tensor (`__getitems__`), not stacked from single rows."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["caption_index"])

    def __getitem__(self, index):
        return {name: values[index] for name, values in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices)
        return {name: values[index] for name, values in self.tensors.items()}

    @staticmethod
    def collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch  # already a batch (__getitems__)


def encode_captions(captions: list[str], tokenizer, text_encoder, device, batch_size: int = 256) -> torch.Tensor:
    """The text encoder's last hidden states for each caption, padded to the tokenizer's length as the pipeline does."""
    states = []
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            ids = tokenize(tokenizer, captions[start : start + batch_size]).to(device)
            states.append(text_encoder(ids, return_dict=False)[0])
    return torch.cat(states)


def cache_latents(rows, data_args, vae, tokenizer, device, batch_size: int = 64, size=None, captions=None):
    """(CachedLatents over `rows`, the distinct captions; the last one is the empty prompt). Images are fitted to
    `size` = (width, height) (default: the square resolution); their original size and crop corner are kept too
    (`original_size`, `crop_top_left`: SDXL-style micro-conditioning, which SD 1.x and SD3 do not take). `captions`
    (distinct, the empty prompt last) indexes several calls' captions alike (one per aspect-ratio bucket)."""
    texts = [pick_caption(c) for c in rows[data_args.caption_column]]
    distinct = captions or sorted(set(texts)) + [""]
    index_of = {caption: i for i, caption in enumerate(distinct)}
    tensors = {"caption_index": torch.tensor([index_of[c] for c in texts], dtype=torch.long)}
    orientations = {"": False, "flipped_": True} if data_args.random_flip else {"": False}
    images = undecoded(rows, data_args.image_column)
    with torch.inference_mode():
        for prefix, flip in orientations.items():
            transform = pixel_transform(data_args, data_args.dataset_name, flip=flip, size=size)
            means, stds = [], []
            for start in range(0, len(images), batch_size):
                out = transform(images[start : start + batch_size])
                posterior = vae.encode(torch.stack(out["pixel_values"]).to(device, vae.dtype)).latent_dist
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
                if not prefix:
                    tensors.setdefault("original_size", []).extend(out["original_size"])
                    tensors.setdefault("crop_top_left", []).extend(out["crop_top_left"])
            tensors[prefix + "latent_mean"], tensors[prefix + "latent_std"] = torch.cat(means), torch.cat(stds)
    for name in ("original_size", "crop_top_left"):
        tensors[name] = torch.tensor(tensors[name], dtype=torch.long).reshape(-1, 2)
    return CachedLatents(tensors), distinct


def pixel_dataset(rows, data_args, tokenizer, size=None):
    """Images decoded, fitted to `size` (default the square resolution) and flipped on the fly; captions as token
    ids (for a text encoder being trained)."""
    transform = pixel_transform(data_args, data_args.dataset_name, size=size)

    def with_ids(batch):
        out = transform(batch)
        return {"pixel_values": out["pixel_values"], "input_ids": list(tokenize(tokenizer, out["caption"]))}

    return undecoded(rows, data_args.image_column).with_transform(with_ids)
