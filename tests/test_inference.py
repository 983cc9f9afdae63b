"""The inference API (engine/inference.py): masks at the image's own size, the image encoded once."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.inference import InferenceInputError, ReferringSegmenter
from models.pretrained import save_pretrained
from tests.test_weights import _perturbed_tiny
from utils.visualize import mask_colours

TOKEN_LENGTH = 10


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = _perturbed_tiny(TOKEN_LENGTH)
    save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 90 x 70 picture with two coloured shapes (not the model's 512 px: masks must come back
    at this size)."""
    image = Image.new("RGB", (90, 70), (200, 200, 200))
    pixels = np.asarray(image).copy()
    pixels[10:30, 10:40] = (215, 40, 40)
    pixels[40:65, 50:85] = (40, 80, 215)
    path = tmp_path_factory.mktemp("scene") / "scene.jpg"
    Image.fromarray(pixels).save(path)
    return str(path)


def test_two_sentences_two_masks_at_the_image_size_one_encoding(model_folder, scene):
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu", precision="fp32")
    encodings = []
    handle = segmenter.model.backbone.vae.encoder.register_forward_hook(
        lambda module, args, output: encodings.append(args[0].shape[0]))
    masks = segmenter(scene, ["the red shape", "the blue one"])
    handle.remove()
    assert masks.shape == (2, 70, 90) and masks.dtype == bool
    assert encodings == [1]  # one image through the VAE for both sentences
    # The same as the model's own predict on the transformed image, upsampled to 70 x 90.
    pixels = segmenter.transform.image_to_tensor(Image.open(scene).convert("RGB"))[None]
    with torch.no_grad():
        expected = segmenter.model.predict(segmenter.tokenize(["the red shape", "the blue one"]),
                                           images=pixels.repeat(2, 1, 1, 1), output_size=(70, 90))
    assert np.array_equal(masks, expected.numpy())


def test_inputs_a_path_an_image_or_an_array_alike(model_folder, scene):
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu")
    picture = Image.open(scene).convert("RGB")
    from_path = segmenter(scene, "the red shape")
    assert from_path.shape == (70, 90)  # one sentence: one (H, W) mask
    assert np.array_equal(segmenter(picture, "the red shape"), from_path)
    assert np.array_equal(segmenter(np.asarray(picture), ["the red shape"])[0], from_path)


@pytest.mark.parametrize("image,sentences,message", [
    (np.zeros((4, 4, 3), np.float32), ["a"], "expected an HxWx3 uint8 array, got float32"),
    (None, ["a"], "expected an image path, PIL image or uint8 array, got NoneType"),
    ("scene", [], "no expression given"),
    ("scene", ["   "], "cannot use the expression '   '"),
])
def test_bad_inputs_are_input_errors(model_folder, scene, image, sentences, message):
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu")
    with pytest.raises(InferenceInputError, match=message):
        segmenter(scene if isinstance(image, str) else image, sentences)


def test_overlay_has_a_legend_and_a_colour_per_expression(model_folder, scene):
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu")
    sentences = [f"thing {index}" for index in range(10)]
    masks = np.zeros((10, 70, 90), bool)
    for index in range(10):
        masks[index, 2 + 5 * index:6 + 5 * index, 10:80] = True
    drawn = segmenter.overlay(scene, masks, sentences)
    assert drawn.width >= 90 and drawn.height > 70  # the legend below the picture
    colours = mask_colours(10)
    assert len(set(colours)) == 10
    pixels = np.asarray(drawn)
    for index in range(10):  # each mask's outline is drawn in its own colour
        assert tuple(pixels[2 + 5 * index, 45]) == colours[index]


def test_a_16_bit_png_gives_the_masks_of_its_8_bit_picture(model_folder, scene, tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) is read as its 8-bit picture, not clipped to white:
    the same masks, the same overlay."""
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu", precision="fp32")
    gray = np.asarray(Image.open(scene).convert("L"))
    eight, sixteen = str(tmp_path / "8.png"), str(tmp_path / "16.png")
    Image.fromarray(gray).save(eight)
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)
    assert Image.open(sixteen).mode == "I;16"
    expected = segmenter(eight, "the red shape")
    white = segmenter(np.full(gray.shape + (3,), 255, np.uint8), "the red shape")
    assert not np.array_equal(expected, white)  # the model tells the picture from a white one
    assert np.array_equal(segmenter(sixteen, "the red shape"), expected)
    assert np.array_equal(np.asarray(segmenter.overlay(sixteen, expected, "the red shape")),
                          np.asarray(segmenter.overlay(eight, expected, "the red shape")))
