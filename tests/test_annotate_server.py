"""`bpo annotate`'s server: the token, escaping, bounded requests, who gets which pair, and labels
that survive a killed server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bpo.annotate import Leases, create_app, next_pair, read_guidelines, serve
from bpo.checks import ConfigError
from bpo.cli import main
from bpo.human import LabelQueue

TOKEN = "t" * 32
XSS = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder whose human/ queue holds 6 pending pairs, one response an HTML payload."""
    queue = LabelQueue(tmp_path / "human")
    prompts = [f"prompt {i}" for i in range(6)]
    queue.add_batch(prompts, [XSS] + [f"a{i}" for i in range(1, 6)],
                    [f"b{i}" for i in range(6)], needed=1, seed=0)  # fmt: skip
    return tmp_path


def client_for(run_dir: Path, lease_seconds: float = 600.0):
    return create_app(run_dir, TOKEN, lease_seconds).test_client()


def get_next(http, client: str, name: str = "") -> dict:
    response = http.get(f"/api/next?client={client}&name={name}", headers={"X-BPO-Token": TOKEN})
    assert response.status_code == 200, response.json
    return response.json


def give(http, client: str, pair: str, choice: str, name: str = "") -> int:
    body = {"client": client, "name": name, "pair": pair, "choice": choice}
    return http.post("/api/label", json=body, headers={"X-BPO-Token": TOKEN}).status_code


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/"),
        ("get", "/api/next?client=aaaaaaaa"),
        ("post", "/api/label"),
        ("get", "/api/progress?client=aaaaaaaa"),
    ],  # fmt: skip
)
def test_a_request_without_the_token_is_refused(run_dir, method, path):
    http = client_for(run_dir)
    assert getattr(http, method)(path).status_code == 403
    wrong = getattr(http, method)(path, headers={"X-BPO-Token": "t" * 31 + "x"})
    assert wrong.status_code == 403 and "session token" in wrong.json["error"]
    assert (run_dir / "human" / "labels.jsonl").exists() is False


def test_the_page_loads_with_the_token_and_shows_run_text_only_as_text(run_dir):
    http = client_for(run_dir)
    page = http.get(f"/?token={TOKEN}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    csp = page.headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in html and "default-src 'none'" in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"  # the URL holds the token
    assert "innerHTML" not in html and "textContent" in html  # run text never parsed as HTML
    first = get_next(http, "aaaaaaaa")["pair"]
    assert XSS in (first["first"], first["second"])  # sent as JSON data, unchanged


def test_guidelines_are_shown_as_text(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "guide.txt"
    path.write_text("Prefer <b>short</b> answers.\nIgnore typos.", encoding="utf-8")
    http = create_app(run_dir, TOKEN, guidelines=read_guidelines(path)).test_client()
    html = http.get(f"/?token={TOKEN}").get_data(as_text=True)
    assert "Prefer &lt;b&gt;short&lt;/b&gt; answers.\nIgnore typos." in html
    assert "<b>short" not in html
    assert 'id="guidelines"' not in client_for(run_dir).get(f"/?token={TOKEN}").get_data(True)
    path.write_text("x" * 20_001, encoding="utf-8")
    with pytest.raises(ConfigError, match="--guidelines: .* more than 20000"):
        read_guidelines(path)


def test_two_annotators_never_receive_the_same_pair(run_dir):
    http = client_for(run_dir)
    seen: dict[str, list[str]] = {"aaaaaaaa": [], "bbbbbbbb": []}
    for _ in range(3):
        for client in seen:
            pair = get_next(http, client)["pair"]
            assert get_next(http, client)["pair"]["id"] == pair["id"]  # a reload: the same pair
            seen[client].append(pair["id"])
            assert give(http, client, pair["id"], "first") == 200
    assert not set(seen["aaaaaaaa"]) & set(seen["bbbbbbbb"])
    assert len(set(seen["aaaaaaaa"] + seen["bbbbbbbb"])) == 6
    assert get_next(http, "aaaaaaaa")["pair"] is None
    status = get_next(http, "bbbbbbbb")["progress"]
    assert (status["complete"], status["waiting"], status["mine"]) == (6, 0, 3)


def test_with_two_labels_per_pair_each_pair_goes_to_two_different_annotators(tmp_path):
    queue = LabelQueue(tmp_path / "human")
    queue.add_batch(["x", "y"], ["a", "c"], ["b", "d"], needed=2, seed=0)
    http = client_for(tmp_path)
    given: dict[str, list[str]] = {}
    for client in ("aaaaaaaa", "bbbbbbbb", "cccccccc"):
        while pair := get_next(http, client, name=client[:3])["pair"]:
            given.setdefault(pair["id"], []).append(client)
            assert give(http, client, pair["id"], "first", name=client[:3]) == 200
    assert sorted(map(sorted, given.values())) == [["aaaaaaaa", "bbbbbbbb"]] * 2
    progress = get_next(http, "cccccccc")["progress"]
    assert progress["agreement"] == 1.0 and progress["pairs_labelled_twice"] == 2
    assert give(http, "aaaaaaaa", pair_id := next(iter(given)), "tie", name="aaa") == 409
    assert give(http, "cccccccc", pair_id, "tie", name="ccc") == 409  # complete already


def test_a_held_pair_goes_to_another_annotator_once_its_lease_ends(run_dir):
    leases, queue = Leases(seconds=0.0), LabelQueue(run_dir / "human")
    first = next_pair(queue, leases, "aaaaaaaa", "client:aaaaaaaa")
    assert next_pair(queue, leases, "bbbbbbbb", "client:bbbbbbbb").id == first.id  # a's ended
    held = Leases(seconds=600.0)
    a = next_pair(queue, held, "aaaaaaaa", "client:aaaaaaaa")
    assert next_pair(queue, held, "bbbbbbbb", "client:bbbbbbbb").id != a.id
    assert next_pair(queue, held, "aaaaaaaa", "client:aaaaaaaa").id == a.id  # still a's
    assert len(held.held) == 2  # one pair per page session, no more


def test_pages_open_at_once_get_different_pairs_and_a_renamed_page_keeps_its_own(run_dir):
    http = client_for(run_dir)
    tabs = ["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"]
    shown = [get_next(http, tab)["pair"]["id"] for tab in tabs]  # all open before any label
    assert len(set(shown)) == 4
    same_name = [get_next(http, tab, name="ann")["pair"]["id"] for tab in ("eeeeeeee", "ffffffff")]
    assert len(set(same_name) | set(shown)) == 6  # one person's two tabs: two pairs
    renamed = get_next(http, "aaaaaaaa", name="bob")["pair"]["id"]
    assert renamed == shown[0]  # a page keeps its pair when its name changes: none is stranded


def test_with_two_labels_per_pair_open_pages_share_a_pair_only_between_two_people(tmp_path):
    LabelQueue(tmp_path / "human").add_batch(["x", "y"], ["a", "c"], ["b", "d"], 2, seed=0)
    http = client_for(tmp_path)
    ann = [get_next(http, tab, name="ann")["pair"] for tab in ("aaaaaaaa", "bbbbbbbb")]
    bob = get_next(http, "cccccccc", name="bob")["pair"]
    cat = get_next(http, "dddddddd", name="cat")["pair"]
    assert ann[0]["id"] != ann[1]["id"] and bob["id"] == ann[0]["id"]
    assert cat["id"] == ann[1]["id"]  # the first pair has its two people on it already
    assert get_next(http, "eeeeeeee", name="dan")["pair"] is None


def test_a_skipped_pair_comes_back_last_and_goes_to_others_first(run_dir):
    http = client_for(run_dir)
    skipped = get_next(http, "aaaaaaaa")["pair"]["id"]
    assert give(http, "aaaaaaaa", skipped, "skip") == 200
    assert get_next(http, "bbbbbbbb")["pair"]["id"] == skipped
    assert give(http, "bbbbbbbb", skipped, "skip") == 200
    order = []
    while pair := get_next(http, "aaaaaaaa")["pair"]:
        order.append(pair["id"])
        assert give(http, "aaaaaaaa", pair["id"], "second") == 200
    assert order[-1] == skipped and len(order) == 6


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"client": "aaaaaaaa", "pair": "nope", "choice": "first"}, 404),
        ({"client": "aaaaaaaa", "pair": "PAIR", "choice": "maybe"}, 400),
        ({"client": "a/../../x", "pair": "PAIR", "choice": "first"}, 400),
        ({"client": "aaaaaaaa", "name": "x" * 65, "pair": "PAIR", "choice": "first"}, 400),
        ({"client": "aaaaaaaa", "pair": "PAIR", "choice": "first", "pad": "x" * 5000}, 413),
        ("not an object", 400),
    ],
)
def test_bad_or_oversized_labels_are_refused_and_nothing_is_written(run_dir, body, code):
    http = client_for(run_dir)
    pair = LabelQueue(run_dir / "human").pending()[0].id
    if isinstance(body, dict):
        body = {k: (pair if v == "PAIR" else v) for k, v in body.items()}
    response = http.post("/api/label", json=body, headers={"X-BPO-Token": TOKEN})
    assert response.status_code == code
    assert LabelQueue(run_dir / "human").labels() == []


def test_other_methods_and_paths_need_the_token_too(run_dir):
    http = client_for(run_dir)
    for method, path in [("options", "/"), ("head", "/"), ("get", "/static/x"),
                         ("get", "/../config.yaml"), ("put", "/api/label")]:  # fmt: skip
        assert getattr(http, method)(path).status_code == 403
    assert http.get("/nope", headers={"X-BPO-Token": TOKEN}).status_code == 404


def test_an_oversized_query_is_refused(run_dir):
    http = client_for(run_dir)
    long = http.get(f"/api/next?client=aaaaaaaa&name={'x' * 2000}", headers={"X-BPO-Token": TOKEN})
    assert long.status_code == 414


def test_annotate_refuses_a_folder_that_is_no_human_run(tmp_path, capsys):
    assert main(["annotate", str(tmp_path / "nothing")]) == 2
    assert "holds no run (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("annotator:\n  type: function\n", encoding="utf-8")
    assert main(["annotate", str(tmp_path), "--status"]) == 2
    assert "annotator.type=function; only runs with annotator.type=human" in (
        capsys.readouterr().err
    )


def start_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """`bpo annotate RUN_DIR --port 0` in a process of its own; its URL, read from its output."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bpo.cli", "annotate", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = server.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
    assert match, line  # listening on this machine only, by default
    return server, *match.groups()


def call(base: str, token: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={
        "X-BPO-Token": token, "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_killed_server_loses_no_label_it_acknowledged(run_dir):
    (run_dir / "config.yaml").write_text("annotator:\n  type: human\n", encoding="utf-8")
    server, base, token = start_server(run_dir)
    given = []
    try:
        for _ in range(4):
            pair = call(base, token, "/api/next?client=aaaaaaaa")["pair"]
            call(base, token, "/api/label",
                 {"client": "aaaaaaaa", "pair": pair["id"], "choice": "second"})  # fmt: skip
            given.append(pair["id"])
    finally:
        server.send_signal(signal.SIGKILL)  # right after the last acknowledgement
        server.wait()
    assert [x.pair for x in LabelQueue(run_dir / "human").labels()] == given
    server, base, token = start_server(run_dir)
    try:
        progress = call(base, token, "/api/progress?client=bbbbbbbb")
        assert (progress["complete"], progress["waiting"]) == (4, 2)
        assert call(base, token, "/api/next?client=bbbbbbbb")["pair"]["id"] not in given
    finally:
        server.terminate()
        server.wait()


def test_a_second_server_for_one_run_is_refused(run_dir):
    (run_dir / "config.yaml").write_text("annotator:\n  type: human\n", encoding="utf-8")
    server, _, _ = start_server(run_dir)
    try:
        with pytest.raises(ConfigError, match="another `bpo annotate` serves"):
            serve(run_dir, port=0)
    finally:
        server.terminate()
        server.wait()


def test_a_busy_port_is_named(run_dir, tmp_path_factory):
    (run_dir / "config.yaml").write_text("annotator:\n  type: human\n", encoding="utf-8")
    tmp_path = tmp_path_factory.mktemp("other")
    (tmp_path / "config.yaml").write_text("annotator:\n  type: human\n", encoding="utf-8")
    server, base, _ = start_server(run_dir)
    try:
        port = base.rsplit(":", 1)[1]
        with pytest.raises(ConfigError, match=f"--port: cannot listen on 127.0.0.1:{port}"):
            serve(tmp_path, port=int(port))
    finally:
        server.terminate()
        server.wait()
