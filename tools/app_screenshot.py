"""Drive the browser app (app.py) in headless Chromium as a user would and save a screenshot:
pick a bundled example (its image and expression), type expressions, press Segment, wait for the
result.

    python app.py --checkpoint checkpoints/model_best_toy.pth --port 7860 &
    python tools/app_screenshot.py http://127.0.0.1:7860/ docs/app.png --text "the red square"

Needs a Chromium and its chromedriver (Debian: apt-get install chromium chromium-driver) and
selenium (in the test extras). tests/test_app.py drives the page with the same function.
"""
import argparse
import os
import shutil
import tempfile

DEFAULT_EXAMPLE = "toy_000701"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser():
    """(the Chromium binary, its chromedriver), or None when either is not installed."""
    binary = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def screenshot(url, out_path, expressions=None, example=DEFAULT_EXAMPLE, timeout=120, window=(1280, 1000)):
    """Open `url`, click the example whose name contains `example` (it fills in the image and its
    expression), replace the expressions with `expressions` (one per line; None keeps the
    example's), press Segment, wait for the result and its message, save the page to `out_path`.

    Returns what the page showed: "legend" and "message" (texts), "example_expression" (the
    expressions box after the click), "image_inputs" (file inputs on the page), "input_size" and
    "result_size" (the input picture's and the result's size on the page, CSS pixels).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError(f"no Chromium with chromedriver found (looked for {', '.join(BROWSERS)} and "
                           f"chromedriver on PATH)")
    binary, driver_path = found
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--no-first-run", "--disable-sync", f"--window-size={window[0]},{window[1]}",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.get(url)
            wait = WebDriverWait(driver, timeout)
            wait.until(expected_conditions.element_to_be_clickable(
                (By.XPATH, f"//*[@id='examples']//tr[.//img[contains(@src, '{example}')]]/td"))).click()
            wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
            box = driver.find_element(By.CSS_SELECTOR, "#expressions textarea")
            wait.until(lambda _: box.get_attribute("value"))
            example_expression = box.get_attribute("value")
            if expressions is not None:
                box.clear()
                box.send_keys("\n".join(expressions))
            driver.find_element(By.CSS_SELECTOR, "#segment").click()
            wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#result img")))
            wait.until(expected_conditions.text_to_be_present_in_element(
                (By.CSS_SELECTOR, "#message"), "expression(s) in"))
            shown = {name: driver.find_element(By.CSS_SELECTOR, f"#{name} img").size for name in ("image", "result")}
            page = {"legend": driver.find_element(By.CSS_SELECTOR, "#legend").text,
                    "message": driver.find_element(By.CSS_SELECTOR, "#message").text,
                    "example_expression": example_expression,
                    "image_inputs": len(driver.find_elements(By.CSS_SELECTOR, "input[type=file]")),
                    "input_size": (shown["image"]["width"], shown["image"]["height"]),
                    "result_size": (shown["result"]["width"], shown["result"]["height"])}
            driver.save_screenshot(str(out_path))
            return page
        finally:
            driver.quit()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the app's address, e.g. http://127.0.0.1:7860/")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--text", action="append", default=None,
                        help="an expression; give it several times for several (default: the example's)")
    parser.add_argument("--example", default=DEFAULT_EXAMPLE,
                        help=f"the bundled example to click (default: {DEFAULT_EXAMPLE})")
    args = parser.parse_args(argv)
    print(screenshot(args.url, args.out, args.text, args.example))


if __name__ == "__main__":
    main()
