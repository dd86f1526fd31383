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


def cache_latents(rows, data_args, vae, tokenizer, device, batch_size: int = 64):
    """(CachedLatents over `rows`, the distinct captions; the last one is the empty prompt)."""
    captions = [pick_caption(c) for c in rows[data_args.caption_column]]
    distinct = sorted(set(captions)) + [""]
    index_of = {caption: i for i, caption in enumerate(distinct)}
    tensors = {"caption_index": torch.tensor([index_of[c] for c in captions])}
    orientations = {"": False, "flipped_": True} if data_args.random_flip else {"": False}
    images = undecoded(rows, data_args.image_column)
    with torch.inference_mode():
        for prefix, flip in orientations.items():
            transform = pixel_transform(data_args, data_args.dataset_name, flip=flip)
            means, stds = [], []
            for start in range(0, len(images), batch_size):
                pixels = torch.stack(transform(images[start : start + batch_size])["pixel_values"])
                posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
            tensors[prefix + "latent_mean"], tensors[prefix + "latent_std"] = torch.cat(means), torch.cat(stds)
    return CachedLatents(tensors), distinct


def pixel_dataset(rows, data_args, tokenizer):
    """Images decoded, cropped and flipped on the fly; captions as token ids (for a text encoder being trained)."""
    transform = pixel_transform(data_args, data_args.dataset_name)

    def with_ids(batch):
        out = transform(batch)
        return {"pixel_values": out["pixel_values"], "input_ids": list(tokenize(tokenizer, out["caption"]))}

    return undecoded(rows, data_args.image_column).with_transform(with_ids)
