"""Aspect-ratio buckets: sizes from ratios, sizes or the data; every batch from one bucket, in an order fixed by
(seed, epoch), the same bucket on every process at a step, and a resumed epoch (accelerate's skip_first_batches
on the prepared loader) continues exactly; the three-ratio digits; DreamBooth's paired batches."""

import pytest
import torch
from PIL import Image

from hfgen.diffusion.buckets import BucketBatchSampler, Bucketed, bucket_problems, bucket_sizes, nearest_bucket
from hfgen.diffusion.data import DIGITS_ASPECT, ImageDataArguments, fit, load_image_splits
from hfgen.diffusion.dreambooth import PriorBatchSampler, prior_preserving_loss


def test_bucket_sizes_from_ratios_sizes_and_the_data():
    assert bucket_sizes(["1:1", "4:3", "3:4"], 512, 64) == [(512, 512), (576, 448), (448, 576)]
    assert bucket_sizes(["768x512", "768x512", "512x768"], 512, 64) == [(768, 512), (512, 768)]  # duplicates merge
    assert bucket_sizes(["auto"], 16, 4, [(48, 32), (32, 32), (32, 48), (48, 32)]) == [(12, 20), (16, 16), (20, 12)]
    assert nearest_bucket((1000, 700), [(16, 16), (24, 16), (16, 24)]) == 1
    assert nearest_bucket((31, 30), [(16, 16), (24, 16), (16, 24)]) == 0
    assert bucket_problems(["4:3", "768x512", "auto"]) and "neither" in bucket_problems(["wide"])[0]
    assert "zero side" in bucket_problems(["0:1"])[0] and not bucket_problems(["4:3", "768x512"])


def test_ratios_that_round_to_one_size_are_merged_with_a_warning(capsys):
    # at resolution 16 with sides in multiples of 8, 4:3 and 1:1 both give 16x16: one bucket, and the user is told
    assert bucket_sizes(["1:1", "4:3", "1:2"], 16, 8) == [(16, 16), (8, 24)]
    assert "1:1, 4:3 all round to 16x16" in capsys.readouterr().out
    bucket_sizes(["768x512", "768x512"], 512, 64)  # the same size given twice: nothing to tell
    assert "warning" not in capsys.readouterr().out


def batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def bucket_of(index, ranges):
    return next(b for b, r in enumerate(ranges) if index in r)


def test_every_batch_is_from_one_bucket_in_an_order_fixed_by_seed_and_epoch():
    ranges = [range(0, 37), range(37, 60), range(60, 71)]
    sampler = BucketBatchSampler(ranges, batch_size=4, seed=3)
    epoch0 = batches(sampler, 0)
    assert len(epoch0) == len(sampler) == 9 + 5 + 2  # incomplete batches dropped
    assert all(len({bucket_of(i, ranges) for i in batch}) == 1 for batch in epoch0)
    assert len({bucket_of(batch[0], ranges) for batch in epoch0[:6]}) > 1  # buckets interleave, not in sequence
    assert batches(BucketBatchSampler(ranges, 4, seed=3), 0) == epoch0  # deterministic
    assert batches(sampler, 1) != epoch0 and batches(BucketBatchSampler(ranges, 4, seed=4), 0) != epoch0
    seen = [i for batch in epoch0 for i in batch]
    assert len(seen) == len(set(seen))  # no image twice in an epoch


def test_two_processes_train_on_the_same_bucket_at_every_step():
    from accelerate.data_loader import BatchSamplerShard

    ranges = [range(0, 37), range(37, 60), range(60, 71)]
    sampler = BucketBatchSampler(ranges, batch_size=4, seed=0, num_processes=2)
    sampler.set_epoch(2)
    per_rank = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(sampler) // 2
    for a, b in zip(*per_rank):
        assert bucket_of(a[0], ranges) == bucket_of(b[0], ranges) and not set(a) & set(b)


def test_a_resumed_epoch_through_the_prepared_loader_continues_exactly():
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from hfgen.diffusion.training import epoch_batches

    sizes = [(4, 4), (6, 4), (4, 6)]
    parts = [torch.utils.data.TensorDataset(torch.full((n, 1, h, w), float(k))) for k, ((w, h), n) in
             enumerate(zip(sizes, (9, 7, 5)))]  # fmt: skip
    dataset = Bucketed(parts, sizes)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset.ranges(), 2, seed=1))
    )
    full = [batch[0] for batch in epoch_batches(accelerator, loader, epoch=3, skip=0)]
    assert len(full) == 4 + 3 + 2 and all(batch.unique().numel() == 1 for batch in full)  # one bucket: one size
    resumed = [batch[0] for batch in epoch_batches(accelerator, loader, epoch=3, skip=5)]
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    other_epoch = [batch[0].shape for batch in epoch_batches(accelerator, loader, epoch=4, skip=0)]
    assert other_epoch != [batch.shape for batch in full]


def test_bucketed_dataset_refuses_a_batch_across_buckets():
    dataset = Bucketed([torch.utils.data.TensorDataset(torch.zeros(3, 2)), torch.utils.data.TensorDataset(torch.ones(3, 4))],
                       [(2, 1), (4, 1)])  # fmt: skip
    assert len(dataset.__getitems__([3, 5])) == 2
    with pytest.raises(ValueError, match="mixes buckets"):
        dataset.__getitems__([1, 4])


def test_three_ratio_digits_and_fitting_to_a_bucket():
    train, _ = load_image_splits(ImageDataArguments(dataset_name=DIGITS_ASPECT, max_eval_samples=8))
    sizes = [image.size for image in train.select(range(30))["image"]]
    assert set(sizes) == {(32, 32), (48, 32), (32, 48)}
    image, (top, left) = fit(Image.new("RGB", (48, 30)), (24, 16), center_crop=True)
    assert image.size == (24, 16) and (top, left) == (0, 1)  # covered: 26x16, centre kept
    image, (top, left) = fit(Image.new("RGB", (32, 48)), (24, 16), center_crop=True)
    assert image.size == (24, 16) and left == 0 and top == (36 - 16) // 2  # covered: 24x36, centre band kept


def test_dreambooth_batches_pair_instance_and_class_images_and_weigh_the_prior():
    sampler = PriorBatchSampler(n_instance=5, n_class=12, batch_size=2, seed=0)
    epoch = batches(sampler, 0)
    assert len(epoch) == 6 and all(len(b) == 4 and max(b[:2]) < 5 and min(b[2:]) >= 5 for b in epoch)
    assert {i for b in epoch for i in b[2:]} == set(range(5, 17))  # every class image once an epoch
    from accelerate.data_loader import BatchSamplerShard

    assert [len(list(BatchSamplerShard(sampler, num_processes=2, process_index=r))) for r in (0, 1)] == [3, 3]
    pred, target = torch.tensor([1.0, 1.0, 3.0, 3.0]), torch.zeros(4)

    def mse(p, t):
        return ((p - t) ** 2).mean()

    assert prior_preserving_loss(mse, (pred, target), None) == 5.0
    assert prior_preserving_loss(mse, (pred, target), 0.5) == 1.0 + 0.5 * 9.0


@pytest.mark.parametrize("buckets", [[], ["3:2", "2:3"]])
def test_every_caption_of_a_list_is_cached_and_one_drawn_per_step(tmp_path, buckets):
    """A row's list of captions: every one cached (with buckets too: their caption set and the cache's agree, was a
    KeyError), and each step draws one from the training RNG, so all of them train (was one, frozen at caching)."""
    import json

    from diffusers import AutoencoderKL

    from conftest import REPO
    from diffusion_fixtures import TINY_VAE, list_caption_folder
    from hfgen.diffusion.buckets import bucketed_latents
    from hfgen.diffusion.image_stage import draw_captions
    from hfgen.diffusion.latents import cache_latents

    folder = list_caption_folder(tmp_path / "images", images=8)
    args = ImageDataArguments(dataset_name=str(folder), resolution=16, aspect_ratio_buckets=buckets,
                              validation_split_percentage=25)  # fmt: skip
    rows = load_image_splits(args)[0]
    vae = AutoencoderKL.from_config({**json.loads((REPO / "recipes/tiny/vae_digits.json").read_text()), **TINY_VAE})
    if buckets:
        dataset, captions = bucketed_latents(rows, args, vae, "cpu", multiple=8)
        batch = dataset.__getitems__(list(dataset.ranges()[0]))
    else:
        dataset, captions = cache_latents(rows, args, vae, None, "cpu")
        batch = dataset.__getitems__(list(range(len(dataset))))
    alternatives = {row[0]: set(row) for row in rows["text"]}
    assert set(captions) == set().union(*alternatives.values()) | {""}
    drawn = [set() for _ in batch["caption_index"]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for seen, index in zip(drawn, draw_captions(batch, generator, "cpu").tolist()):
            seen.add(captions[index])
    assert drawn == [alternatives[captions[i]] for i in batch["caption_index"].tolist()]


def test_bucket_sizes_follow_the_exif_orientation(tmp_path):
    """A 48x32 JPEG stored turned (EXIF orientation 6: shown 32x48) goes to the 2:3 bucket, as it trains."""
    from hfgen.diffusion.buckets import image_sizes

    image = Image.new("RGB", (48, 32))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (48, 32)).save(tmp_path / "plain.jpg")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "turned.jpg", "text": "a"}\n{"file_name": "plain.jpg", "text": "b"}\n'
        '{"file_name": "plain.jpg", "text": "c"}\n{"file_name": "plain.jpg", "text": "d"}\n'
    )
    args = ImageDataArguments(dataset_name=str(tmp_path), resolution=16, validation_split_percentage=25)
    rows = load_image_splits(args)[0]
    assert sorted(image_sizes(rows, "image")) == sorted((32, 48) if text == "a" else (48, 32) for text in rows["text"])


def test_a_bucket_smaller_than_a_batch_is_refused_naming_its_image_count():
    """Incomplete batches are dropped: a lone wide image among squares (its own `auto` bucket) passed, because
    only a run where no bucket held a full batch was refused, and it never trained."""
    from hfgen.diffusion.buckets import BucketBatchSampler, short_bucket_problem

    dataset = Bucketed([torch.utils.data.TensorDataset(torch.zeros(9, 2)), torch.utils.data.TensorDataset(torch.ones(1, 4))],
                       [(16, 16), (24, 8)])  # fmt: skip
    problem = short_bucket_problem(dataset, BucketBatchSampler(dataset.ranges(), 2, seed=0))
    assert problem and "1 bucket(s)" in problem and "{'24x8': 1}" in problem, problem
    assert short_bucket_problem(dataset, BucketBatchSampler(dataset.ranges(), 1, seed=0)) is None


def test_auto_buckets_take_an_image_over_200_times_taller_than_wide():
    """4/1200 rounded (to 2 decimals) to a ratio of 0: ZeroDivisionError after the models had loaded."""
    sizes = bucket_sizes(["auto"], 16, 8, image_sizes=[(4, 1200), (16, 16)])
    assert (16, 16) in sizes and len(sizes) == 2
    tall = next(size for size in sizes if size != (16, 16))
    assert tall[0] == 8 and tall[1] > 200  # as narrow as the sides allow, about 16^2 / 0.0033 tall
