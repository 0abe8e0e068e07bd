"""`bpo annotate` in a real browser: Debian's chromium, headless, driven by playwright. A person
labels every phase of a waiting run with the keyboard; the run goes on and its pool holds the
choices. Skipped where chromium is not installed (`apt-get install chromium`; .ci/run does)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpo.human import LabelQueue
from tests.conftest import TINY_TASK

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install chromium"
    ),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]  # fmt: skip
XSS = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser.new_page()
        browser.close()


def bpo(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bpo.cli", *args], env=env, text=True, **kwargs)


def serve(run_dir: Path) -> tuple[subprocess.Popen, str]:
    server = bpo("annotate", str(run_dir), "--port", "0", stdout=subprocess.PIPE)
    url = re.search(r"http://\S+", server.stdout.readline()).group(0)
    return server, url


def test_a_response_holding_html_is_shown_as_text_and_runs_nothing(tmp_path, page):
    LabelQueue(tmp_path / "human").add_batch(["say <b>hi</b>"], [XSS], ["plain"], 1, seed=0)
    server, url = serve(tmp_path)
    try:
        page.goto(url)
        page.wait_for_selector("#task:not([hidden])")
        shown = page.inner_text("#first") + page.inner_text("#second")
        assert XSS in shown and page.inner_text("#prompt") == "say <b>hi</b>"
        assert page.evaluate("window.pwned") is None  # neither the script nor the handler ran
        assert page.query_selector_all("#task script, #task img, #task b") == []
    finally:
        server.terminate()
        server.wait()


def test_a_whole_run_labelled_by_keyboard_goes_on_and_fills_the_pool(tiny_model, tmp_path, page):
    run = tmp_path / "run"
    log = open(tmp_path / "train.log", "w")
    train = bpo("train", f"model.path={tiny_model}", *TINY_TASK, "T=4", "B=4", "F=2",
                "method=bpo", "lr=1e-3", "sampling.max_new_tokens=6", "eval.every=0",
                "eval.n_prompts=8", "device=cpu", "annotator.type=human", f"output_dir={run}",
                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    while not (run / "config.yaml").exists():
        assert train.poll() is None, (tmp_path / "train.log").read_text()
        time.sleep(0.1)
    server, url = serve(run)
    keys = {"1": "first", "2": "second", "t": "tie"}
    pressed: dict[str, str] = {}
    skipped = None
    try:
        page.goto(url)
        deadline = time.monotonic() + 240
        while train.poll() is None:
            assert time.monotonic() < deadline, "the run did not finish"
            pair = page.get_attribute("#task", "data-pair")
            if page.is_hidden("#task") or not pair:
                time.sleep(0.2)  # the run trains, then asks for the next phase's pairs
                continue
            if skipped is None:  # pass the first pair on: it must come back after the others
                skipped = pair
                key = "s"
            else:
                key = "12t"[len(pressed) % 3] if len(pressed) < 3 else "12"[len(pressed) % 2]
                pressed[pair] = keys[key]
            page.keyboard.press(key)
            while page.get_attribute("#task", "data-pair") == pair:  # saved, then the next
                time.sleep(0.05)
        assert train.wait() == 0, (tmp_path / "train.log").read_text()
        assert page.inner_text("#progress").startswith(f"{len(pressed)} of {len(pressed)} pairs")
    finally:
        server.terminate()
        server.wait()
        if train.poll() is None:
            train.kill()
    assert skipped in pressed  # it came back and was labelled
    shown = {p.id: p for p in LabelQueue(run / "human").pending()}
    pool = [json.loads(line) for line in open(run / "pool.jsonl")]
    decided = {pair: choice for pair, choice in pressed.items() if choice != "tie"}
    assert len(pool) == len(decided) == 16 and {r["phase"] for r in pool} == {0, 1}
    for pair, choice in decided.items():  # y_w is the response the person chose
        p = shown[pair]
        chosen, rejected = (p.first, p.second) if choice == "first" else (p.second, p.first)
        assert {"prompt": p.prompt, "chosen": chosen, "rejected": rejected}.items() <= next(
            r for r in pool if r["prompt"] == p.prompt and r["chosen"] == chosen
        ).items()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["human_labels"] == len(pressed) and summary["dropped_ties"] == 1
