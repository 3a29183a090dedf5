#!/usr/bin/env python3
"""Drives one headless Chromium for tests/it/ui.rs, one command per line.

The Rust test owns the scenario (servers, proxies, what to wait for and assert); this script
only relays WebDriver calls through selenium, so it stays small. It starts Chromium through
chromedriver, prints `ready VERSION` (or `error MESSAGE` and exits 1), then reads commands
from stdin, each a line `NAME ARGUMENT` with the argument a JSON string, and answers each
with one line: `ok RESULT` (a JSON string) or `error MESSAGE` (a JSON string).

    open URL          load URL and wait for its load event
    eval SCRIPT       run SCRIPT as a function body; its return value, as text (JSON for
                      anything but a string)
    click SELECTOR    click the first element matching the CSS selector, as a user would
    screenshot PATH   save a PNG of the page (as far as the window shows it)
    console ""        the browser console's messages so far, one per line
    quit ""           close the browser and exit

Usage: bridge.py --chromium PATH --chromedriver PATH --profile DIR [--insecure-certs]
"""

import argparse
import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

# Selenium Manager would try to download a driver; the test names Debian's.
os.environ["SE_OFFLINE"] = "true"

# From shared/ci-notes.md: headless without a sandbox (root) or a GPU, and nothing that
# reaches for the network by itself (a closed network refuses it, noisily).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    # Timers of a page that looks hidden are throttled; a headless window may look hidden.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--window-size=1280,900",
    "--force-device-scale-factor=1",
]


def reply(status, value):
    sys.stdout.write(f"{status} {json.dumps(value)}\n")
    sys.stdout.flush()


def start(args):
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={args.profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The nginx test's certificate comes from a CA made by the test.
    options.accept_insecure_certs = args.insecure_certs
    service = Service(executable_path=args.chromedriver, log_output=os.path.join(args.profile, "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    return driver


def run(driver, name, argument):
    if name == "open":
        driver.get(argument)
        return ""
    if name == "eval":
        value = driver.execute_script(argument)
        return value if isinstance(value, str) else json.dumps(value)
    if name == "click":
        driver.find_element(By.CSS_SELECTOR, argument).click()
        return ""
    if name == "screenshot":
        # The document, not the window: no empty space below a short page.
        if not driver.find_element(By.TAG_NAME, "html").screenshot(argument):
            raise RuntimeError(f"could not write {argument}")
        return argument
    if name == "console":
        return "\n".join(f"{entry['level']} {entry['message']}" for entry in driver.get_log("browser"))
    raise ValueError(f"unknown command {name!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--chromedriver", required=True)
    parser.add_argument("--profile", required=True, help="a fresh directory for the browser's profile")
    parser.add_argument("--insecure-certs", action="store_true", help="accept any TLS certificate")
    args = parser.parse_args()
    try:
        driver = start(args)
    except Exception as error:  # whatever failed, the test shows it
        reply("error", f"cannot start {args.chromium} through {args.chromedriver}: {error}")
        return 1
    try:
        reply("ready", driver.capabilities.get("browserVersion", "?"))
        for line in sys.stdin:
            name, _, argument = line.rstrip("\n").partition(" ")
            if name == "quit":
                break
            try:
                reply("ok", run(driver, name, json.loads(argument) if argument else ""))
            except Exception as error:  # reported to the test, which decides
                reply("error", f"{type(error).__name__}: {error}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
