"""The inference API (engine/inference.py): masks at the image's own size, the image encoded once."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine import inference
from engine.inference import ExpressionTruncatedWarning, InferenceInputError, ReferringSegmenter
from models.pretrained import save_pretrained
from tests.test_weights import _perturbed_tiny
from utils.errors import InputError
from utils.visualize import CAPTION_MAX_WIDTH, contrasting_colours, outline_shade

TOKEN_LENGTH = 10


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = _perturbed_tiny(TOKEN_LENGTH)
    save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def small_segmenter():
    """The same kind of model at 64 px, for the tests where the model's size does not matter."""
    return ReferringSegmenter(_perturbed_tiny(TOKEN_LENGTH, img_size=64), device="cpu", precision="fp32")


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
    (None, ["a"], "expected an image path, encoded image bytes, PIL image or uint8 array, got NoneType"),
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
    colours = contrasting_colours(Image.open(scene).convert("RGB"), masks)
    assert len(set(colours)) == 10
    pixels = np.asarray(drawn)
    for index in range(10):  # each mask edged in black or white, then its own colour
        assert tuple(pixels[2 + 5 * index, 45]) == outline_shade(colours[index])
        assert tuple(pixels[3 + 5 * index, 45]) == colours[index]
        assert tuple(pixels[70 + 2 + 14 * index + 5, 7]) == colours[index]  # the legend's square


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


@pytest.mark.parametrize("call,message", [
    (lambda s, scene: s(scene, b"the red shape"), "sentences: expected a string or a list of strings, got bytes"),
    (lambda s, scene: s(scene, ["the red shape", 3]), r"sentences\[1\]: expected a string, got int"),
    (lambda s, scene: s(np.zeros((0, 0, 3), np.uint8), "a"), r"image: it is empty \(0 x 0 pixels\)"),
    (lambda s, scene: s(np.zeros((5, 0), np.uint8), "a"), r"image: it is empty \(0 x 5 pixels\)"),
    (lambda s, scene: s(b"\xff\xd8 not a JPEG", "a"), "cannot read image the 13 bytes given as an image: cannot identify the image format$"),
    (lambda s, scene: s.overlay(scene, np.zeros((5, 5), bool)),
     r"masks: expected \(H, W\) or \(N, H, W\) boolean masks of the image's 70 x 90 pixels, got bool of shape "
     r"\(1, 5, 5\)"),
    (lambda s, scene: s.overlay(scene, np.zeros((2, 70, 90), bool), ["one"]), "sentences: 1 for 2 mask"),
    (lambda s, scene: ReferringSegmenter(s.model, max_pixels=6000)(scene, "a"),
     r"is 90 x 70 = 6,300 pixels, more than max_pixels \(6,000\)"),
])
def test_bad_arguments_are_one_input_error_naming_the_argument(small_segmenter, scene, call, message):
    with pytest.raises(InputError, match=message) as error:
        call(small_segmenter, scene)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("setting,message", [
    (dict(device="gpu"), "device='gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="tpu"), "device='tpu': expected"),
    (dict(device=""), "device='': expected"),
    (dict(device="meta"), "device='meta': expected 'auto', 'cpu', 'cuda' or 'cuda:N' .the model computes"),
    (dict(device=3.5), "device=3.5: expected"),
    (dict(precision="fp8"), "precision='fp8': expected one of auto, fp32, bf16, fp16"),
    (dict(precision=None), "precision=None: expected one of"),
    (dict(precision="float32"), "precision='float32': expected one of"),
    (dict(max_pixels=0), "max_pixels=0: expected a positive number of pixels or None"),
])
def test_bad_settings_are_refused_before_the_model_is_read(model_folder, small_segmenter, setting, message,
                                                           monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InputError, match=message):
        ReferringSegmenter.from_pretrained(model_folder, **setting)
    with pytest.raises(InputError, match=message):  # the same from a model in hand
        ReferringSegmenter(small_segmenter.model, **setting)


def test_the_bytes_of_an_encoded_image_are_an_image(small_segmenter, scene):
    segmenter = small_segmenter
    with open(scene, "rb") as handle:
        data = handle.read()
    assert np.array_equal(segmenter(data, ["the red shape", "the blue one"]),
                          segmenter(scene, ["the red shape", "the blue one"]))


def test_a_long_expression_is_cut_with_a_warning_and_its_caption_fits(small_segmenter, scene):
    segmenter = small_segmenter
    sentence = "the red shape " + "and then some more words " * 400  # 10,014 characters
    with pytest.warns(ExpressionTruncatedWarning, match=r"longer than the model's 10 tokens \(token_length\)"):
        mask = segmenter(scene, sentence)
    drawn = segmenter.overlay(scene, mask, sentence)
    assert drawn.width <= CAPTION_MAX_WIDTH and drawn.height < 70 + 40  # one line, cut (was 43003 px wide)


def test_large_images_upsample_at_a_capped_size_and_few_sentences_at_a_time(small_segmenter, monkeypatch):
    """Above UPSAMPLE_MAX_PIXELS the logits are upsampled to that many pixels, UPSAMPLE_BYTES of them at
    a time, and the masks enlarged (nearest) to the image's size: memory no longer grows with
    pixels x sentences (a 48 MP image with 16 sentences needed one 6.1 GB allocation)."""
    segmenter = small_segmenter
    monkeypatch.setattr(inference, "UPSAMPLE_MAX_PIXELS", 40 * 30)
    monkeypatch.setattr(inference, "UPSAMPLE_BYTES", 2 * 4 * 40 * 30 * 2)  # two sentences' logits
    sizes = []
    original = inference.upsample_logits
    monkeypatch.setattr(inference, "upsample_logits", lambda logits, size: sizes.append(
        (len(logits), tuple(size))) or original(logits, size))
    image = np.full((300, 400, 3), 200, np.uint8)
    image[50:150, 60:200] = (215, 40, 40)
    sentences = ["the red shape", "the grey", "a thing", "the left one", "the background"]
    masks = segmenter(image, sentences)
    assert masks.shape == (5, 300, 400) and sizes == [(2, (30, 40)), (2, (30, 40)), (1, (30, 40))]
    # Each mask is its 30 x 40 mask enlarged ten times.
    pixels = segmenter.transform.image_to_tensor(Image.fromarray(image))[None]
    with torch.no_grad():
        small = segmenter.model.predict(segmenter.tokenize(sentences), images=pixels.repeat(5, 1, 1, 1),
                                        output_size=(30, 40))
    assert np.array_equal(masks, small.numpy().repeat(10, axis=1).repeat(10, axis=2))
