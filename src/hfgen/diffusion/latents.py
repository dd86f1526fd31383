"""Training inputs of the t2i stage: latents cached once from a frozen VAE (with caption indices), or pixels and
token ids prepared on the fly. Also used by scripts/bench_t2i.py, so both train on the same pre-encoded data."""

from __future__ import annotations

import torch

from hfgen.diffusion.components import tokenize
from hfgen.diffusion.data import caption_options, pixel_transform, row_rng, undecoded


class CachedLatents(torch.utils.data.Dataset):
    """Per image: the VAE posterior's mean and std (and the flipped image's), and its caption's index (with list
    captions also every alternative's, `caption_choices`, and their count: `image_stage.draw_captions` draws one
    per step). Batches are gathered in one indexing per tensor (`__getitems__`), not stacked from single rows."""

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
    options = [caption_options(c) for c in rows[data_args.caption_column]]
    distinct = captions or sorted({c for texts in options for c in texts}) + [""]
    index_of = {caption: i for i, caption in enumerate(distinct)}
    tensors = {"caption_index": torch.tensor([index_of[texts[0]] for texts in options], dtype=torch.long)}
    if any(len(texts) > 1 for texts in options):  # list captions: every one cached, one drawn per step
        width = max(len(texts) for texts in options)
        tensors["caption_choices"] = torch.tensor(
            [[index_of[c] for c in texts] + [index_of[texts[0]]] * (width - len(texts)) for texts in options]
        )
        tensors["caption_count"] = torch.tensor([len(texts) for texts in options])
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


class PixelRows(torch.utils.data.Dataset):
    """Rows decoded and transformed (`pixel_transform`) on the fly, each row's random crop, flip and caption drawn
    from `row_rng(seed, epoch, row)`: a resumed run sees what the uninterrupted run saw (the global `random`, which
    checkpoints save, is a prefetched batch ahead at a checkpoint). The loop sets the epoch (`epoch_batches`)."""

    def __init__(self, rows, transform, seed: int):
        self.rows, self.transform, self.seed, self.epoch = rows, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        out = self.transform(self.rows[indices], [row_rng(self.seed, self.epoch, i) for i in indices])
        return [{name: values[i] for name, values in out.items()} for i in range(len(indices))]


def pixel_dataset(rows, data_args, tokenizer, seed: int, size=None):
    """Images decoded, fitted to `size` (default the square resolution) and flipped on the fly; captions as token
    ids (for a text encoder being trained)."""
    transform = pixel_transform(data_args, data_args.dataset_name, size=size)

    def with_ids(batch, rngs):
        out = transform(batch, rngs)
        return {"pixel_values": out["pixel_values"], "input_ids": list(tokenize(tokenizer, out["caption"]))}

    return PixelRows(undecoded(rows, data_args.image_column), with_ids, seed)
