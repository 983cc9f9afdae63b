"""Drive the browser app (app.py) in headless Chromium as a user would and save a screenshot:
pick a bundled example, type expressions, press Segment, wait for the result.

    python app.py --checkpoint checkpoints/model_best_toy.pth --port 7860 &
    python tools/app_screenshot.py http://127.0.0.1:7860/ docs/app.png --text "the red square"

Needs Debian's chromium and chromium-driver (see README) and selenium (in the test extras).
tests/test_app.py drives the page with the same function.
"""
import argparse
import os
import tempfile

DEFAULT_EXAMPLE = "toy_000701"


def screenshot(url, out_path, expressions, example=DEFAULT_EXAMPLE, timeout=120):
    """Open `url`, click the example whose name contains `example`, type `expressions` (one per
    line), press Segment, wait for the result and its message, save the page to `out_path`.
    Returns the legend's text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--no-first-run", "--disable-sync", "--window-size=1280,1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            driver.get(url)
            wait = WebDriverWait(driver, timeout)
            wait.until(expected_conditions.element_to_be_clickable(
                (By.XPATH, "//*[contains(@class, 'gallery') or contains(@class, 'example')]"
                           f"//*[contains(., '{example}')]"))).click()
            wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#picture img")))
            driver.find_element(By.CSS_SELECTOR, "#expressions textarea").send_keys("\n".join(expressions))
            driver.find_element(By.CSS_SELECTOR, "#segment").click()
            wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#result img")))
            wait.until(expected_conditions.text_to_be_present_in_element(
                (By.CSS_SELECTOR, "#message"), "expression(s) in"))
            legend = driver.find_element(By.CSS_SELECTOR, "#legend").text
            driver.save_screenshot(str(out_path))
            return legend
        finally:
            driver.quit()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the app's address, e.g. http://127.0.0.1:7860/")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--text", action="append", required=True,
                        help="an expression; give it several times for several")
    parser.add_argument("--example", default=DEFAULT_EXAMPLE,
                        help=f"the bundled example to click (default: {DEFAULT_EXAMPLE})")
    args = parser.parse_args(argv)
    print(screenshot(args.url, args.out, args.text, args.example))


if __name__ == "__main__":
    main()
