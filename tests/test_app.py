"""The browser app (app.py): started as a user starts it, called over HTTP with gradio_client and
driven in a headless Chromium."""
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from engine.inference import ReferringSegmenter
from tests.programs import SMALL_RUN, environment, main_here
from tools.app_screenshot import screenshot
from utils.paths import REPO_ROOT

pytestmark = pytest.mark.xdist_group("app")
EXAMPLE = os.path.join(REPO_ROOT, "docs", "examples", "toy_000701.jpg")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(toy_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("app_model")
    assert main_here("train.py", ["--dataset", "toy", "--refer_data_root", toy_root, "--output-dir",
                                  str(output), "--epochs", "1", *SMALL_RUN]) == 0
    return str(output / "model_best_toy.pth")


@pytest.fixture(scope="module")
def app_url(checkpoint):
    """`python app.py --checkpoint CKPT --port P` in a subprocess, until it serves."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--checkpoint", checkpoint, "--port", str(port)],
                               cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    try:
        for line in process.stdout:
            if "Running on local URL" in line:
                break
            if time.time() > deadline:
                raise AssertionError("the app did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_masks_over_http_equal_the_inference_api(app_url, checkpoint, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    expressions = ["the red square", "the yellow shape"]
    overlay, legend, download, message = client.predict(handle_file(EXAMPLE), "\n".join(expressions),
                                                         api_name="/segment")
    assert message.startswith("2 expression(s) in ") and "ms on cpu" in message
    assert "the red square" in legend and "the yellow shape" in legend and "% |" in legend
    with zipfile.ZipFile(download) as archive:
        names = sorted(archive.namelist())
        assert names == ["mask_1_the_red_square.png", "mask_2_the_yellow_shape.png"]
        archive.extractall(tmp_path)
    expected = ReferringSegmenter.from_pretrained(checkpoint, device="cpu", precision="fp32")(EXAMPLE, expressions)
    with Image.open(EXAMPLE) as image:
        size = image.size
    for name, mask in zip(names, expected):
        with Image.open(tmp_path / name) as saved:
            assert saved.size == size
            assert np.array_equal(np.asarray(saved) > 0, mask)
    with Image.open(overlay) as drawn:
        assert drawn.width >= size[0] and drawn.height > size[1]  # the legend under the image


def test_bad_inputs_get_a_message(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    result = client.predict(handle_file(EXAMPLE), "  \n ", api_name="/segment")
    assert result == (None, "", None, "Type at least one expression, one per line.")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    result = client.predict(handle_file(str(text_file)), "the red square", api_name="/segment")
    assert result[3] == "notes.txt is not an image this app can read (JPEG, PNG, ...)."


def test_large_images_and_a_missing_model_get_a_message():
    from app import AppModel, segment

    result = segment(AppModel(segmenter=object(), label="x"), 1000, EXAMPLE, "the red square")
    assert result[3] == "The image is 112 x 128 pixels; this app takes at most 1,000 pixels (--max_pixels)."
    missing = AppModel(missing="train it with `bash train.sh toy ./logs/toy 1`")
    assert segment(missing, 1000, EXAMPLE, "the red square")[3] == missing.missing


def test_in_a_browser(app_url, tmp_path):
    """Headless Chromium: pick the example, type an expression, press Segment, see the result."""
    legend = screenshot(app_url, tmp_path / "app.png", ["the red square"], example="toy_000701")
    assert "the red square" in legend
    with Image.open(tmp_path / "app.png") as picture:
        assert picture.size[0] >= 1000
