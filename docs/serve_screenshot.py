"""Takes docs/serve.png: starts `serve` from the command line, drives the page in headless Chromium.

    python docs/serve_screenshot.py --decoder=workdirs/smollm2_demo --steering=golden_gate=DIR [--out=docs/serve.png]

Needs Debian's chromium + chromium-driver (as tests/test_serve.py). Asks the page's default
dialog its default questions, colours the tokens, asks about one token, compares the steered
generation, then saves the screenshot and stops the server.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decoder", required=True)
    p.add_argument("--steering", default="")
    p.add_argument("--out", default="docs/serve.png")
    p.add_argument("--token", type=int, default=9, help="which span token to click (index into the span)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lit_jax.main", "--config=configs/serve.py", f"--config.decoder={args.decoder}",
           f"--config.serve.port={port}"]
    if args.steering:
        cmd.append(f"--config.serve.steering=('{args.steering}',)")
    server = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/info", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1350"):
            options.add_argument(a)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        wait = WebDriverWait(d, 600, poll_frequency=0.2)
        idle = lambda d: not d.find_element(By.ID, "busy").is_displayed()  # noqa: E731
        d.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#info tr"))
        d.find_element(By.ID, "ask-btn").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answers li") and idle(d))
        d.find_element(By.ID, "colour-btn").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".tok.scored") and idle(d))
        d.find_elements(By.CSS_SELECTOR, ".tok.span")[args.token].click()
        d.find_element(By.ID, "token-ask-btn").click()
        wait.until(lambda d: d.find_element(By.ID, "token-answer").text and idle(d))
        if args.steering:
            d.find_element(By.ID, "steer-btn").click()
            wait.until(lambda d: d.find_element(By.ID, "steered").text and idle(d))
        d.save_screenshot(args.out)
        d.quit()
        print("wrote", args.out)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


if __name__ == "__main__":
    main()
