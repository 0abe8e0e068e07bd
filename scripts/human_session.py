"""Two stand-in annotators label a waiting `annotator.type: human` run through `bpo annotate`'s
page, in Debian's chromium (headless, driven by playwright), by keyboard, as people would.

"ann" presses the key of the response with the higher gold digest reward (t on equal rewards);
"bob" does the same but picks the other one on a random fifth of the pairs. The script serves
the run, labels until the run writes summary.json, saves a screenshot of ann's page, and prints
both pages' progress lines and the labelling time. It made docs/HUMAN.md's session:

    bpo train configs/digest/human_bpo.yaml annotator.labels_per_pair=2 &
    python scripts/human_session.py runs/digest/human_bpo --screenshot docs/annotate.png
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from bpo.tasks.digest import reward

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screenshot", type=Path, help="PNG of ann's page at her 10th pair")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    while not (args.run_dir / "config.yaml").exists():  # the run has not started yet
        time.sleep(0.2)
    server = subprocess.Popen(
        ["bpo", "annotate", str(args.run_dir), "--port", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = re.search(r"http://\S+", server.stdout.readline()).group(0)
    rng = random.Random(args.seed)
    presses = {"ann": 0, "bob": 0}
    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
        pages = {}
        for name in presses:
            page = browser.new_context(viewport={"width": 1100, "height": 480}).new_page()
            page.add_init_script(f"localStorage.setItem('bpo-name', {json.dumps(name)})")
            page.goto(url)
            pages[name] = page
        while not (args.run_dir / "summary.json").exists():
            busy = False
            for name, page in pages.items():
                pair = page.get_attribute("#task", "data-pair")
                if page.is_hidden("#task") or not pair:
                    continue
                busy = True
                x = page.inner_text("#prompt")
                r1, r2 = reward(x, page.inner_text("#first")), reward(x, page.inner_text("#second"))
                if name == "bob" and rng.random() < 0.2:
                    r1, r2 = r2, r1
                if name == "ann" and presses["ann"] == 9 and args.screenshot:
                    page.screenshot(path=args.screenshot)
                page.keyboard.press("1" if r1 > r2 else "2" if r2 > r1 else "t")
                presses[name] += 1
                while page.get_attribute("#task", "data-pair") == pair:  # saved, then the next
                    time.sleep(0.05)
            if not busy:
                time.sleep(0.3)  # the run is training; its next phase will ask for more
        for name, page in pages.items():
            print(f"{name}: {page.inner_text('#progress')}")
        browser.close()
    server.terminate()
    print(json.dumps({"labels": presses, "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
