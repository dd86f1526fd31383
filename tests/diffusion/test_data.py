"""Image data: the embedded digits, imagefolder datasets, and the checks that catch bad images before training."""

import json

import pytest
from PIL import Image

from hfgen.diffusion.data import (
    DIGIT_WORDS,
    DIGITS,
    ImageDataArguments,
    check_image_data,
    digits_dataset,
    load_image_splits,
    pixel_transform,
    resize_and_crop,
    undecoded,
)


def test_digits_are_all_1797_scans_with_varied_captions_naming_the_digit():
    data = digits_dataset()
    rows = list(data["train"]) + list(data["test"])
    assert len(rows) == 1797 and len(data["test"]) == 179
    assert {row["label"] for row in rows} == set(range(10))
    assert rows[0]["image"].size == (32, 32)
    for row in rows:
        k = row["label"]
        assert str(k) in row["text"].split() or DIGIT_WORDS[k] in row["text"].replace(",", "").split(), row
    sevens = {row["text"] for row in rows if row["label"] == 7}
    assert "a handwritten digit 7" in sevens and len(sevens) >= 5


def test_pixels_are_cropped_to_resolution_in_minus_one_to_one():
    args = ImageDataArguments(dataset_name=DIGITS, resolution=16)
    train, _ = load_image_splits(args)
    batch = undecoded(train, "image").with_transform(pixel_transform(args, DIGITS))[:4]
    pixels = batch["pixel_values"][0]
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.5  # ink is bright
    assert batch["caption"][0] == train[0]["text"]


@pytest.mark.parametrize("center", [True, False])
def test_resize_and_crop_keeps_a_square_of_the_resolution(center):
    image = Image.new("RGB", (40, 20))
    assert resize_and_crop(image, 16, center_crop=center).size == (16, 16)


def imagefolder(tmp_path, files=3, listed=3, truncate=None):
    for i in range(files):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    if truncate is not None:
        data = (tmp_path / f"{truncate}.png").read_bytes()
        (tmp_path / f"{truncate}.png").write_bytes(data[: len(data) // 2])
    rows = [{"file_name": f"{i}.png", "text": f"a red square {i}"} for i in range(listed)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageDataArguments(dataset_name=str(tmp_path), resolution=8, validation_split_percentage=34)


def test_a_clean_imagefolder_passes_the_checks(tmp_path):
    args = imagefolder(tmp_path)
    assert check_image_data(args, need_captions=True) == []
    train, evaluation = load_image_splits(args)
    assert len(train) + len(evaluation) == 3 and train.column_names == ["image", "text"]


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_relative_image_paths_in_a_data_file_are_beside_it(tmp_path, suffix):
    """CSV and parquet load their strings as large_string (JSON as string): the paths resolve for all three."""
    import datasets

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    rows = datasets.Dataset.from_dict({"file_name": [f"images/{i}.png" for i in range(4)],
                                       "text": [f"a red square {i}" for i in range(4)]})  # fmt: skip
    path = tmp_path / f"data.{suffix}"
    getattr(rows, f"to_{suffix}")(str(path))
    args = ImageDataArguments(dataset_name=str(path), image_column="file_name", resolution=8,
                              validation_split_percentage=25)  # fmt: skip
    assert check_image_data(args, need_captions=True) == []


def test_relative_paths_in_parquet_image_structs_are_beside_the_file(tmp_path):
    """A parquet image column of {bytes: null, path: 'imgs/K.png'} structs (datasets' image storage) was read
    relative to the working directory: 'imgs/21.png' does not exist, though string paths resolved."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    images = [{"bytes": None, "path": f"imgs/{i}.png"} for i in range(4)]
    pq.write_table(pa.table({"image": images, "text": [f"red {i}" for i in range(4)]}), tmp_path / "structs.parquet")
    args = ImageDataArguments(dataset_name=str(tmp_path / "structs.parquet"), resolution=8,
                              validation_split_percentage=25)  # fmt: skip
    assert check_image_data(args, need_captions=True) == []
    train, _ = load_image_splits(args)
    batch = pixel_transform(args, "x", flip=False)(train[:3])
    reds = sorted(round(float(pixels[0, 0, 0]) * 127.5 + 127.5) for pixels in batch["pixel_values"])
    assert all(red in {0, 60, 120, 180} for red in reds) and len(set(reds)) == 3, reds
    assert np.isfinite(batch["pixel_values"][0].numpy()).all()


def test_missing_image_file_is_reported_by_name(tmp_path):
    problems = check_image_data(imagefolder(tmp_path, files=3, listed=4), need_captions=True)
    assert len(problems) == 1 and "3.png" in problems[0] and "does not exist" in problems[0]


def test_truncated_png_is_reported_by_name(tmp_path):
    problems = check_image_data(imagefolder(tmp_path, truncate=1), need_captions=True)
    assert len(problems) == 1 and "1.png" in problems[0] and "cannot be decoded" in problems[0]


def test_wrong_caption_column_names_the_columns(tmp_path):
    args = imagefolder(tmp_path)
    args.caption_column = "caption"
    problems = check_image_data(args, need_captions=True)
    assert len(problems) == 1 and "'caption'" in problems[0] and "'text'" in problems[0]
    # the vae stage needs no captions: the same data is fine there
    assert check_image_data(args, need_captions=False) == []


def test_resolution_must_suit_the_vae():
    assert "multiple of 8" in check_image_data(ImageDataArguments(dataset_name=DIGITS, resolution=12), True)[0]


def test_images_as_cameras_and_tools_write_them_decode_as_they_look(tmp_path):
    """A 16-bit grayscale PNG (was clipped to white), a phone JPEG stored turned with its EXIF orientation (was
    trained sideways), raw PNG bytes in a parquet column (were refused), image paths relative to the data file
    (were looked up in the working directory)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hfgen.diffusion.data import open_image

    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    pixels = np.asarray(open_image(str(tmp_path / "depth.png"), "image"))
    assert pixels.min() == 0 and 250 <= pixels.max() <= 255 and 120 <= np.median(pixels) <= 135

    photo = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(str(tmp_path / "phone.jpg"), "image").size == (20, 40)

    # a black shape drawn only in the alpha channel (RGB all zero): was a blank black square, now black on white
    shape = np.zeros((16, 16, 4), dtype=np.uint8)
    shape[4:12, 4:12, 3] = 255
    Image.fromarray(shape, mode="RGBA").save(tmp_path / "logo.png")
    alpha_only = Image.fromarray(shape[..., 3], mode="L")
    Image.merge("LA", (Image.new("L", (16, 16), 0), alpha_only)).save(tmp_path / "gray.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.paste(1, (4, 4, 12, 12))
    palette.save(tmp_path / "palette.png", transparency=0)  # colour 0 (black) transparent, a red square on it
    logo = np.asarray(open_image(str(tmp_path / "logo.png"), "image"))
    assert (logo[0, 0] == 255).all() and (logo[8, 8] == 0).all()
    assert (np.asarray(open_image(str(tmp_path / "palette.png"), "image"))[0, 0] == 255).all()
    gray = np.asarray(open_image(str(tmp_path / "gray.png"), "image"))
    assert (gray[0, 0] == 255).all() and (gray[8, 8] == 0).all()

    (tmp_path / "set" / "imgs").mkdir(parents=True)
    encoded = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "set" / "imgs" / f"{i}.png")
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 40 * i, 0)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    rows = [{"image": f"imgs/{i}.png", "text": f"a red square {i}"} for i in range(6)]
    (tmp_path / "set" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"image": encoded, "text": [f"green {i}" for i in range(6)]}), tmp_path / "bytes.parquet")
    for name in (tmp_path / "set" / "data.jsonl", tmp_path / "bytes.parquet"):
        args = ImageDataArguments(dataset_name=str(name), resolution=8, validation_split_percentage=34)
        assert check_image_data(args, need_captions=True) == []
        train, _ = load_image_splits(args)
        batch = pixel_transform(args, str(name), flip=False)(train[:2])
        assert batch["pixel_values"][0].shape == (3, 8, 8)


def test_rgb_and_grayscale_pngs_with_a_transparent_colour_key_are_laid_on_white(tmp_path):
    """optipng/oxipng store a binary-alpha logo as RGB or grayscale plus a tRNS colour key: only palette images
    were laid on white, so these trained on black (the key's colour)."""
    import numpy as np

    from hfgen.diffusion.data import open_image

    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[4:12, 4:12] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    gray = np.zeros((16, 16), dtype=np.uint8)
    gray[4:12, 4:12] = 128
    Image.fromarray(gray).save(tmp_path / "gray.png", transparency=0)
    deep = np.zeros((16, 16), dtype=np.uint16)
    deep[4:12, 4:12] = 32768
    Image.fromarray(deep).save(tmp_path / "deep.png", transparency=0)
    for name, shape in (("rgb.png", (255, 0, 0)), ("gray.png", (128,) * 3), ("deep.png", (128,) * 3)):
        assert Image.open(tmp_path / name).info.get("transparency") is not None  # the key was written
        pixels = np.asarray(open_image(str(tmp_path / name), "image"))
        assert tuple(pixels[0, 0]) == (255, 255, 255), name
        assert tuple(pixels[8, 8]) == shape, name


def test_images_an_imagefolder_metadata_leaves_out_are_warned_about(tmp_path, capsys):
    assert check_image_data(imagefolder(tmp_path, files=4, listed=3), need_captions=True) == []
    out = capsys.readouterr().out
    assert "warning" in out and "1 image(s)" in out and "3.png" in out and "metadata" in out
    # Excel's "CSV UTF-8" starts metadata.csv with a BOM: its first column read as "\ufefffile_name", no image was
    # listed, and the warning was lost
    (tmp_path / "metadata.jsonl").unlink()
    rows = "".join(f"{i}.png,a red square {i}\r\n" for i in range(3))
    (tmp_path / "metadata.csv").write_bytes(("\ufefffile_name,text\r\n" + rows).encode())
    assert check_image_data(ImageDataArguments(dataset_name=str(tmp_path), resolution=8), need_captions=True) == []
    out = capsys.readouterr().out
    assert "1 image(s)" in out and "3.png" in out, out


def test_dreambooth_instance_images_include_tiff_and_gif(tmp_path):
    from hfgen.diffusion.dreambooth import image_files

    for suffix in ("png", "tif", "tiff", "gif"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"a.{suffix}")
    assert [p.suffix for p in image_files(tmp_path)] == [".gif", ".png", ".tif", ".tiff"]


def test_an_empty_caption_and_an_undecodable_image_are_named_by_their_row_in_the_file(tmp_path):
    """The held-out slice is drawn at random (train_test_split shuffles), so row i of the training split is some
    other row of the file: the messages named the split's position, which sent the user to the wrong line."""
    for i in range(20):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "7.png").write_bytes(b"not a png")
    rows = [{"image": f"{i}.png", "text": "" if i == 12 else f"square {i}"} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ImageDataArguments(dataset_name=str(tmp_path / "data.jsonl"), resolution=8, validation_split_percentage=25)
    problems = " ".join(check_image_data(args, need_captions=True))
    assert "rows [13], counted from 1" in problems, problems  # the 13th line holds the empty caption
    assert "row 8 (counted from 1) image" in problems and "7.png" in problems, problems


@pytest.mark.parametrize(
    "caption, complaint",
    [
        (["a red square", None], "neither a string nor a list of strings"),
        ({"en": "a red square"}, "neither a string nor a list of strings"),
        ([["a red square"]], "neither a string nor a list of strings"),
        (["a red square", 5], "neither a string nor a list of strings"),
        (["a red square", ""], "blank"),
        ("   ", "blank"),
    ],
)
def test_a_caption_training_cannot_use_or_would_train_unconditioned_is_named_by_row_at_check(
    tmp_path, caption, complaint
):
    """These passed the check: the non-strings then stopped `train` with a message naming no dataset, column or
    row, and a blank list item trained as the unconditional caption on half of that image's steps."""
    for i in range(8):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "text": caption if i == 5 else f"square {i}"} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ImageDataArguments(dataset_name=str(tmp_path / "data.jsonl"), resolution=8, validation_split_percentage=25)
    problems = " ".join(check_image_data(args, need_captions=True))
    assert complaint in problems and "column 'text'" in problems and "rows [6]" in problems, problems


def test_a_bad_caption_past_the_rows_the_check_reads_is_named_by_row_before_training(tmp_path):
    """The check reads the first 1,000 rows; a list caption holding None further on stopped `train` with "caption
    [...] is neither a string nor a list of strings", naming no dataset, column or row (None the same; "" trained
    as the unconditional caption)."""
    from types import SimpleNamespace

    from hfgen.diffusion.image_stage import training_rows
    from hfgen.errors import UserError

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    bad = {1002: ["square", None], 1005: None, 1007: ""}  # the last two: a crash naming nothing, an unasked dropout
    rows = [{"image": "0.png", "text": bad.get(i, f"square {i}")} for i in range(1010)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ImageDataArguments(dataset_name=str(tmp_path / "data.jsonl"), resolution=8)
    assert check_image_data(args, need_captions=True, hold_out=False) == []  # past the rows it reads
    with pytest.raises(UserError) as refused:
        training_rows(args, SimpleNamespace(instance_data_dir=None), seed=0)
    assert "column 'text' has empty values (rows [1006, 1008]" in str(refused.value)
    assert "column 'text' has values that are neither a string nor a list of strings (rows [1003]" in str(refused.value)


def test_a_class_subfolder_label_column_as_captions_is_refused_at_check(tmp_path):
    """`caption_column: label` on a folder of class subfolders passed the check (label is exempt from the numbers
    test for KTO), then `train` stopped with "caption 2 is neither a string nor a list of strings"."""
    for name in ("red", "green", "blue"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    args = ImageDataArguments(dataset_name=str(tmp_path), resolution=8, caption_column="label")
    problems = check_image_data(args, need_captions=True)
    assert len(problems) == 1 and "column 'label' holds class ids" in problems[0] and "red" in problems[0], problems


def test_captions_longer_than_the_text_encoder_takes_are_counted_in_a_warning(capsys):
    """The encoding cuts captions at the tokenizer's length (truncation, as the pipelines encode prompts): 300-word
    captions trained as their first words with no word in the log or at check."""
    from hfgen.diffusion.components import build_caption_tokenizer
    from hfgen.diffusion.image_stage import warn_of_cut_captions

    captions = ["a red square", "a blue circle", " ".join(f"word{i}" for i in range(40))]
    rows = {"text": [[captions[0], captions[1]], captions[2], captions[2]]}
    tokenizer = build_caption_tokenizer(captions, 16)
    warn_of_cut_captions(rows, "text", tokenizer, tokenizer.model_max_length, "max_caption_tokens")
    out = capsys.readouterr().out
    assert "1 of 3 distinct captions are longer than max_caption_tokens (16 tokens" in out and "word0" in out, out
    warn_of_cut_captions({"text": captions[:2]}, "text", tokenizer, tokenizer.model_max_length, "max_caption_tokens")
    assert capsys.readouterr().out == ""
    # the flow stage counts against each distinct tokenizer (SD3 from scratch shares one CLIP tokenizer twice)
    from types import SimpleNamespace

    from hfgen.diffusion.components import CAPTION_TOKENIZER
    from hfgen.stages.t2i_flow import caption_lengths

    scratch = SimpleNamespace(tokenizer_name=CAPTION_TOKENIZER, pretrained_model_name_or_path=None,
                              max_sequence_length=None)  # fmt: skip
    parts = {"tokenizer": tokenizer, "tokenizer_2": tokenizer, "tokenizer_3": None, "transformer": None}
    assert caption_lengths(scratch, parts) == [(tokenizer, 16, "max_caption_tokens")]


def test_held_out_images_are_measured_on_the_same_pixels_whatever_the_training_crops(tmp_path):
    """vae with center_crop: false evaluated its held-out images on fresh random crops each time: with learning
    rate 0 the reconstruction MSE went 0.10437 -> 0.10486, crop noise reported as the training's effect."""
    import numpy as np
    import torch

    from hfgen.stages import vae

    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1))
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a ramp"}) + "\n")
    args = ImageDataArguments(dataset_name=str(tmp_path), resolution=16, center_crop=False)
    rows = undecoded(load_raw_rows(args), "image")
    pixels = [vae.held_out_transform(args, "x")(rows[:1])["pixel_values"][0] for _ in range(4)]
    assert all(torch.equal(pixels[0], p) for p in pixels[1:])
    centre = pixel_transform(ImageDataArguments(dataset_name=str(tmp_path), resolution=16), "x", flip=False)
    assert torch.equal(pixels[0], centre(rows[:1])["pixel_values"][0])


def load_raw_rows(args):
    from hfgen.data.loading import load_raw

    return load_raw(args.dataset_name)["train"]


def test_t2i_stages_train_on_every_image_when_the_data_has_no_test_split(tmp_path):
    """t2i / t2i_flow carved validation_split_percentage (at least one row) out of a dataset without a test split
    and never used it: a 2-image set trained on 1 image, 16 kohya images on 15, with no note."""
    from types import SimpleNamespace

    from hfgen.diffusion.image_stage import training_rows

    args = imagefolder(tmp_path, files=2, listed=2)
    assert check_image_data(args, need_captions=True, hold_out=False) == []
    rows = training_rows(args, SimpleNamespace(instance_data_dir=None), seed=0)
    assert sorted(rows["text"]) == ["a red square 0", "a red square 1"]
    train, evaluation = load_image_splits(args)  # the vae stage still measures a held-out slice
    assert len(train) + len(evaluation) == 2 and len(evaluation) >= 1


def test_dreambooth_instance_images_are_decoded_at_check_from_subfolders_without_hidden_files(tmp_path):
    """macOS copies leave `._0.png` AppleDouble files: taken as images, they passed the check (which decoded no
    instance image) and stopped `train`; images in a subfolder were left out without a word."""
    from hfgen.diffusion.dreambooth import DreamBoothArguments, dreambooth_problems, instance_files

    (tmp_path / "more").mkdir()
    for name in ("0.png", "more/1.png"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / name)
    (tmp_path / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    args = DreamBoothArguments(instance_data_dir=str(tmp_path), instance_prompt="a sks square")
    assert [p.relative_to(tmp_path).as_posix() for p in instance_files(tmp_path)] == ["0.png", "more/1.png"]
    assert dreambooth_problems(args, None, "base") == []
    (tmp_path / "more" / "2.png").write_bytes((tmp_path / "0.png").read_bytes()[:40])  # a truncated copy
    problems = dreambooth_problems(args, None, "base")
    assert len(problems) == 1 and "2.png" in problems[0] and "cannot be decoded" in problems[0], problems


def test_an_image_over_pil_s_pixel_limit_is_named_not_a_traceback(tmp_path, monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (a 14000x14000 scan) with DecompressionBombError, which is no
    OSError: a raw traceback at check, exit 1. (The limit is lowered here so that a small image crosses it.)"""
    from hfgen.diffusion.buckets import image_sizes
    from hfgen.diffusion.data import open_image
    from hfgen.errors import UserError

    Image.new("1", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="huge.png' is too large to decode .*4096 pixels.*downscale it"):
        open_image(str(tmp_path / "huge.png"), "image")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "huge.png", "text": "a scan"}) + "\n")
    rows = load_raw_rows(ImageDataArguments(dataset_name=str(tmp_path)))
    with pytest.raises(UserError, match="too large to decode"):
        image_sizes(rows, "image")


def test_an_empty_caption_in_a_caption_folder_names_its_image(tmp_path):
    """A kohya-style folder (or one metadata.jsonl per subfolder) has no single file whose line a row number is:
    "rows [11]" named nothing the user could open; the image beside the caption file is named now."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(6):
            Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / folder / f"x{i}.png")
            (tmp_path / folder / f"x{i}.txt").write_text("" if (folder, i) == ("b", 2) else f"square {folder}{i}")
    args = ImageDataArguments(dataset_name=str(tmp_path), resolution=8)
    problems = " ".join(check_image_data(args, need_captions=True, hold_out=False))
    assert "empty values in column 'text'" in problems and "images ['b/x2.png']" in problems, problems
