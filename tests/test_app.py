"""The browser app (app.py): started as a user starts it, called over HTTP with gradio_client and
driven in a headless Chromium."""
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.inference import ReferringSegmenter
from tests.programs import SMALL_RUN, environment, main_here
from tools.app_screenshot import find_browser, screenshot
from utils.errors import InputError
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


def png_header(path, width, height):
    """A PNG file that declares `width` x `height` pixels but holds none: what a reader sees first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return str(path)


def test_bad_inputs_get_a_message(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    result = client.predict(handle_file(EXAMPLE), "  \n ", api_name="/segment")
    assert result == (None, "", None, "Type at least one expression, one per line.")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    result = client.predict(handle_file(str(text_file)), "the red square", api_name="/segment")
    assert result[3] == "notes.txt is not an image this app can read (JPEG, PNG, ...)."
    # A 400-megapixel PNG (a decompression bomb) is too large, not unreadable.
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    result = client.predict(handle_file(bomb), "the red square", api_name="/segment")
    assert result[3] == ("bomb.png is too large: more than 178,956,970 pixels; this app takes at most "
                         "16,777,216 pixels (--max_pixels).")


def test_requests_are_bounded_and_a_missing_model_gets_a_message(tmp_path):
    from app import AppModel, Limits, segment

    model = AppModel(segmenter=object(), label="x")  # refused before the model is used
    result = segment(model, Limits(pixels=1000), EXAMPLE, "the red square")
    assert result[3] == "The image is 112 x 128 pixels; this app takes at most 1,000 pixels (--max_pixels)."
    large = png_header(tmp_path / "large.png", 4096, 4096)
    result = segment(model, Limits(), large, "\n".join(f"expression {index}" for index in range(50)))
    assert result[3] == "50 expressions; one request takes at most 16 (--max_expressions)."
    result = segment(model, Limits(), large, "\n".join(f"expression {index}" for index in range(5)))
    assert result[3] == ("5 expressions on a 4096 x 4096 image make 83,886,080 mask pixels; one request takes "
                         "at most 67,108,864 (--max_request_pixels): use fewer expressions or a smaller image.")
    missing = AppModel(missing="train it with `bash train.sh toy ./logs/toy 1`")
    assert segment(missing, Limits(), EXAMPLE, "the red square")[3] == missing.missing


def test_a_long_expression_is_said_to_be_read_in_part(checkpoint):
    from app import AppModel, Limits, segment

    model = AppModel(ReferringSegmenter.from_pretrained(checkpoint, device="cpu", precision="fp32"), label="x")
    long = "the red square " + "that sits on the left of the picture " * 20
    overlay, legend, _, message = segment(model, Limits(), EXAMPLE, f"the yellow shape\n{long}")
    assert message.endswith("Longer than the model's 16 tokens, so read only in part: expression 2")
    assert overlay.width <= 640  # its caption cut, the picture enlarged to 448 px


def test_a_port_out_of_range_or_in_use_is_one_line(capsys):
    import app

    with pytest.raises(SystemExit) as exit_info:
        app.main(["--port", "70000"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: argument --port: must be a port number in [1, 65535], got 70000 (see ")
    assert error.count("\n") == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port} .Address already in use.: "
                                             f"another program may use --port {port}"):
            app.main(["--port", str(port), "--checkpoint", "never/read.pth"])


def test_every_example_comes_with_an_expression():
    from app import bundled_examples, example

    examples = bundled_examples()
    assert len(examples) == 5 and all(os.path.isfile(path) and text for path, text in examples)
    assert {os.path.basename(path): text for path, text in examples}["toy_000701.jpg"] == "the red square"
    assert example(f"{EXAMPLE}=the left one") == (EXAMPLE, "the left one") and example(EXAMPLE) == (EXAMPLE, "")


def browser_or_skip():
    """The browser test runs where Chromium and chromedriver are installed; elsewhere it is skipped
    saying why, unless RIS_REQUIRE_BROWSER=1 (.ci/run sets it) makes their absence a failure."""
    if find_browser() is None:
        reason = ("no Chromium with chromedriver installed (apt-get install chromium chromium-driver); "
                  "RIS_REQUIRE_BROWSER=1 makes this a failure")
        if os.environ.get("RIS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RIS_REQUIRE_BROWSER=1, but {reason.split(';')[0]}")
        pytest.skip(reason)


@pytest.fixture(scope="module")  # the module's scope: decided before the app is started for it
def browser():
    browser_or_skip()


def test_without_a_browser_the_test_skips_unless_one_is_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("RIS_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium with chromedriver installed"):
        browser_or_skip()
    monkeypatch.setenv("RIS_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="RIS_REQUIRE_BROWSER=1, but no Chromium"):
        browser_or_skip()


def test_in_a_browser(browser, app_url, tmp_path):
    """Headless Chromium: pick an example (it brings its expression), press Segment, see the result
    larger than the input, with one image input on the page."""
    page = screenshot(app_url, tmp_path / "app.png", None, example="toy_000701")
    assert page["example_expression"] == "the red square"
    assert page["image_inputs"] == 1
    assert "the red square" in page["legend"] and "1 expression(s) in" in page["message"]
    assert page["result_size"][0] >= page["input_size"][0] and page["result_size"][1] >= page["input_size"][1]
    with Image.open(tmp_path / "app.png") as picture:
        assert picture.size[0] >= 1000
