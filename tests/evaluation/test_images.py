"""Image metrics: the digit classifier is strong and independent, the distances behave as distances."""

import numpy as np
import pytest

from hfgen.evaluation.images import (
    as_pipeline_sees,
    digit_classifier,
    digit_features,
    digit_metrics,
    frechet_distance,
    mean_pairwise_distance,
    prompt_adherence,
    real_digits,
    to_digit_pixels,
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


def test_digit_metrics_of_real_digits_look_real():
    pixels, labels = real_digits()
    results = digit_metrics([pixels[labels == k][:30] for k in range(10)], resolution=16)
    assert results["quality/prompt_adherence"] > 0.95
    assert results["diversity/pairwise_distance_ratio"] == pytest.approx(1.0, abs=0.15)
    assert results["quality/frechet_distance"] < 1.0
