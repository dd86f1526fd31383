"""Image metrics: the digit classifier is strong and independent, the distances behave as distances."""

import numpy as np
import pytest

from hfgen.evaluation.images import (
    as_pipeline_sees,
    bucket_adherence_of,
    digit_classifier,
    digit_features,
    digit_metrics,
    frechet_distance,
    in_bucket,
    mean_pairwise_distance,
    normalised_digit_classifier,
    prompt_adherence,
    real_digit_image,
    real_digits,
    to_digit_pixels,
    to_normalised_digit_pixels,
)


def test_classifier_is_strong_on_held_out_real_digits():
    _, accuracy, held_out, labels = digit_classifier()
    assert accuracy >= 0.97
    assert len(held_out) == len(labels) > 400


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_noise():
    features = digit_features(real_digits()[0])
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    pixels = real_digits()[0]
    distances = [
        frechet_distance(features, digit_features(np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 1)))
        for sigma in (0.05, 0.2, 0.5)
    ]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_pairwise_distance_is_zero_for_copies_and_positive_for_different_images():
    pixels, labels = real_digits()
    sevens = pixels[labels == 7]
    assert mean_pairwise_distance(np.repeat(sevens[:1], 10, axis=0)) == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_distance(sevens) > 0.1
    # all digits together vary more than one digit's images
    assert mean_pairwise_distance(pixels[:300]) > mean_pairwise_distance(sevens)


def test_adherence_rewards_the_right_digit_and_punishes_the_wrong_one():
    _, _, held_out, labels = digit_classifier()
    right, _ = prompt_adherence({k: held_out[labels == k] for k in range(10)})
    wrong, _ = prompt_adherence({k: held_out[labels == (k + 1) % 10] for k in range(10)})
    assert right > 0.95 and wrong < 0.05


def test_real_digits_keep_their_adherence_through_the_pipeline_resize_path():
    _, _, held_out, labels = digit_classifier()
    resized = {k: as_pipeline_sees(held_out[labels == k][:20], resolution=16) for k in range(10)}
    adherence, _ = prompt_adherence(resized)
    assert adherence > 0.93


def test_images_are_read_as_8x8_grayscale():
    from PIL import Image

    image = Image.new("RGB", (16, 16), (255, 255, 255))
    pixels = to_digit_pixels([image, image.resize((32, 32))])
    assert pixels.shape == (2, 64) and np.allclose(pixels, 1.0)


def test_digit_metrics_of_a_perfect_generator_meet_their_references():
    # real digits through the path generated images take (resized to the resolution, back to 8x8), as a perfect
    # generator would hand them over: the references were of raw digits, which that path smooths, so such a
    # generator scored diversity ratio 0.6 and Fréchet 0.66 against a "floor" of 0.028 (two halves of 898 raw digits)
    pixels, labels = real_digits()
    rng = np.random.default_rng(1)
    for per_prompt in (20, 1):  # (the Fréchet reference has as many images as were generated)
        drawn = [rng.choice(np.flatnonzero(labels == k), per_prompt, replace=False) for k in range(10)]
        results = digit_metrics([as_pipeline_sees(pixels[rows], resolution=16) for rows in drawn], resolution=16)
        assert results["quality/prompt_adherence"] > 0.9
        assert results["quality/frechet_distance"] == pytest.approx(
            results["quality/frechet_distance_real_images"], rel=0.25
        )
        if per_prompt > 1:
            assert results["diversity/pairwise_distance_ratio"] == pytest.approx(1.0, abs=0.15)


# ---- the aspect-ratio bucket measure ----


def test_bucket_measure_scores_real_digits_high_in_every_bucket_and_the_wrong_digit_low():
    classifier, accuracy = normalised_digit_classifier()
    assert accuracy >= 0.97
    _, _, held_out, labels = digit_classifier()
    # the recipes' buckets, the flow test's 12x20, and sizes of other scales no recipe names
    for size in [(16, 16), (24, 16), (16, 24), (12, 20), (48, 32), (32, 64)]:
        real = {k: to_normalised_digit_pixels(in_bucket(held_out[labels == k][:10], size)) for k in range(10)}
        assert prompt_adherence(real, classifier)[0] >= 0.93, size
        shifted = {k: real[(k + 1) % 10] for k in range(10)}  # digit k + 1 drawn for k
        assert prompt_adherence(shifted, classifier)[0] <= 0.05, size
    # eval.json's figures for one bucket: the measure and the earlier centred crop, each beside real digits
    figures = bucket_adherence_of([in_bucket(held_out[labels == k][:5], (24, 16)) for k in range(10)], (24, 16))
    assert figures["quality/prompt_adherence_bucket_24x16"] >= 0.9
    assert figures["quality/prompt_adherence_bucket_24x16_real_images"] >= 0.95
    assert figures["quality/prompt_adherence_bucket_24x16_centre_crop_real_images"] >= 0.95


def test_bucket_normalisation_undoes_placement_and_scale_but_keeps_shape():
    from PIL import Image

    _, _, held_out, _ = digit_classifier()
    digit = real_digit_image(held_out[0])
    alone = to_normalised_digit_pixels([digit])[0]
    for canvas_size, scale, corner in [((48, 32), 1.0, (0, 0)), ((32, 48), 0.5, (3, 25)), ((60, 20), 0.5, (40, 2))]:
        placed = digit.resize((round(32 * scale), round(32 * scale)), Image.BILINEAR)
        canvas = Image.new("L", canvas_size)
        canvas.paste(placed, corner)
        assert np.abs(to_normalised_digit_pixels([canvas])[0] - alone).mean() < 0.05, (canvas_size, scale, corner)
    stretched = digit.resize((64, 32), Image.BILINEAR)  # a wide digit stays wide: the measure sees its shape
    assert np.abs(to_normalised_digit_pixels([stretched])[0] - alone).mean() > 0.1
