"""Screenshots of the labelling page in headless Chromium (the one infra/system-packages.sh installs).

Starts `instructflow label` (ties allowed, two rankings per prompt) on a generation file of synthetic-task
prompts with four responses each, then, as two people in two browser sessions:

1. `name.png`: the name form a person sees first;
2. `ranking.png`: ana half-way through a prompt: two responses ranked by keyboard, the next one tied with
   the first, one flagged unacceptable, the rest still to place; her progress at the top;
3. `stats.png`: /stats after ana and ben ranked every prompt: progress per person and Kendall's tau between
   them per prompt and on average.

    .venv/bin/python bench/label_screenshots.py --out docs/images

It writes the PNGs and prints their paths. The Korean responses need a Korean font on the machine (Debian:
fonts-nanum), else Chromium draws boxes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)

from apps.label import announced_url  # noqa: E402

PROMPTS = [
    ("What is 17 + 25?", ["42", "42, since 17 + 25 = 42.", "41", "The answer is 52."]),
    ("Translate 'cat' into Korean.", ["고양이", "개", "The Korean word for cat is 고양이.", "cat"]),
    ("Rename the variable x to count in: x = x + 1", ["count = count + 1", "x = count + 1", "count = x + 1",
                                                      "count += 1"]),
]


def browser(binary: str, driver_path: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,620", "--no-first-run", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver_path))


def until(driver, script: str, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        raise SystemExit("no Chromium or chromedriver on PATH: run `sh infra/system-packages.sh`")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="label-shots-") as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(
            json.dumps({"prompt_index": p, "sample": s, "prompt": prompt, "response": response},
                       ensure_ascii=False) + "\n"
            for p, (prompt, responses) in enumerate(PROMPTS) for s, response in enumerate(responses)),
            encoding="utf-8")
        page = subprocess.Popen([sys.executable, "-m", "apps.cli", "label", str(samples), "--port", "0", "--ties",
                                 "--min-rankings", "2", "--root", str(ROOT)], cwd=ROOT,
                                env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        url = next(filter(None, map(announced_url, page.stdout)))
        ana, ben = browser(binary, driver_path), browser(binary, driver_path)
        shots = []
        try:
            def start(driver, name: str) -> None:
                driver.get(url)
                until(driver, "return document.body.dataset.state === 'name'", "the name form")
                if name == "ana":
                    driver.find_element(By.ID, "name").send_keys("ana")
                    shots.append(args.out / "name.png")
                    driver.save_screenshot(str(shots[-1]))
                else:
                    driver.find_element(By.ID, "name").send_keys(name)
                driver.find_element(By.ID, "start").click()
                until(driver, "return document.body.dataset.state === 'ranking'", f"{name}'s first prompt")

            def keys(driver, text: str) -> None:
                ActionChains(driver).send_keys(text).perform()
                time.sleep(0.2)

            start(ana, "ana")
            keys(ana, "2134" + Keys.ENTER)  # prompt 0: 2, 1, 3, 4
            until(ana, "return document.getElementById('prompt').dataset.promptIndex === '1'", "prompt 1")
            keys(ana, "13")  # prompt 1 half-way: 1, then 3 ...
            keys(ana, "=")  # ... tied with 1
            keys(ana, "2u")  # 2 placed and flagged unacceptable
            shots.append(args.out / "ranking.png")
            ana.save_screenshot(str(shots[-1]))
            keys(ana, "4" + Keys.ENTER)
            until(ana, "return document.getElementById('prompt').dataset.promptIndex === '2'", "prompt 2")
            keys(ana, "1423" + Keys.ENTER)
            until(ana, "return document.body.dataset.state === 'done'", "ana done")
            start(ben, "ben")
            for order in ("1234", "1324", "1432"):
                current = ben.execute_script("return document.getElementById('prompt').dataset.promptIndex")
                keys(ben, order + Keys.ENTER)
                until(ben, f"return document.body.dataset.state === 'done' || "
                           f"document.getElementById('prompt').dataset.promptIndex !== '{current}'", "ben's next")
            until(ben, "return document.body.dataset.state === 'done'", "ben done")
            ben.get(url.split("?")[0] + "stats")
            until(ben, "return document.body.dataset.state === 'ready'", "the stats page")
            shots.append(args.out / "stats.png")
            ben.save_screenshot(str(shots[-1]))
        finally:
            ana.quit()
            ben.quit()
            page.terminate()
            page.wait(10)
    for shot in shots:
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
