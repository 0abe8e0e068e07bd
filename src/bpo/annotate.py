"""`bpo annotate RUN_DIR`: a local web page on which people label a run's pending pairs.

A Flask app over the run's `human/` queue (bpo.human). Each annotator (a page session, or a
name) is handed pairs it has not labelled, held for it for `lease_seconds` so that no one else
gets them while it decides; a pair reaches a second annotator only when `labels_per_pair` asks
for it. A label is on disk (fsync'd) before the page hears back. Every request must carry the
session token printed in the URL; the page shows prompts and responses as text only; request
sizes are bounded; the app reads and writes the run's `human/` folder and nothing else.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import socket
import threading
import time
from importlib import resources
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, render_template_string, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from bpo.checks import ConfigError
from bpo.human import CHOICES, SKIP, LabelQueue, PendingPair, counted_labels

MAX_REQUEST_BYTES = 4096
"""Largest request body accepted (a label is ~200 bytes)."""
MAX_QUERY_BYTES = 1024
CLIENT = re.compile(r"[A-Za-z0-9-]{8,64}")
MAX_NAME = 64


class Leases:
    """Which annotator holds which pair until when, in memory (a restarted server forgets them,
    which only frees pairs sooner)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.held: dict[str, dict[str, float]] = {}  # pair -> who -> expiry
        self.lock = threading.Lock()

    def others(self, pair: str, who: str, now: float) -> int:
        return sum(w != who and t > now for w, t in self.held.get(pair, {}).items())

    def mine(self, who: str, now: float) -> list[str]:
        return [p for p, holders in self.held.items() if holders.get(who, 0) > now]

    def take(self, pair: str, who: str, now: float) -> None:
        self.held.setdefault(pair, {})[who] = now + self.seconds

    def drop(self, pair: str, who: str) -> None:
        self.held.get(pair, {}).pop(who, None)


def next_pair(queue: LabelQueue, leases: Leases, who: str) -> PendingPair | None:
    """The pair `who` should label next, leased to it: one it holds already, else the first
    that needs labels, that it has not labelled, and that others' leases do not cover; pairs it
    skipped come last. Call with `leases.lock` held."""
    pairs, labels = queue.pending(), queue.labels()
    counted = counted_labels(pairs, labels)
    skipped = {label.pair for label in labels if label.who == who and label.choice == SKIP}
    now = time.monotonic()
    open_pairs = []
    for order, pair in enumerate(pairs):
        votes = counted[pair.id]
        if len(votes) >= pair.needed or any(v.who == who for v in votes):
            continue
        if len(votes) + leases.others(pair.id, who, now) >= pair.needed:
            continue  # enough annotators are on it already
        open_pairs.append((pair.id not in leases.mine(who, now), pair.id in skipped, order, pair))
    if not open_pairs:
        return None
    pair = min(open_pairs, key=lambda c: c[:3])[3]
    leases.take(pair.id, who, now)
    return pair


def create_app(run_dir: str | Path, token: str, lease_seconds: float = 600.0) -> Flask:
    """The labelling app of the run in `run_dir`; every request must carry `token`."""
    queue = LabelQueue(Path(run_dir) / "human")
    leases = Leases(lease_seconds)
    page = resources.files("bpo").joinpath("templates/annotate.html").read_text(encoding="utf-8")
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    @app.before_request
    def check_request() -> None:
        if len(request.query_string) > MAX_QUERY_BYTES:
            abort(414)
        given = request.headers.get("X-BPO-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "this page needs the session token printed by `bpo annotate`")
        g.nonce = secrets.token_urlsafe(16)

    @app.errorhandler(HTTPException)
    def error(e: HTTPException) -> tuple[Response, int]:
        return jsonify(error=e.description), e.code or 500

    @app.after_request
    def harden(response: Response) -> Response:
        nonce = g.get("nonce", "none")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # the URL holds the token
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index() -> str:
        return render_template_string(page, nonce=g.nonce, run=Path(run_dir).name)

    @app.get("/api/next")
    def next_() -> Response:
        who = _who(request.args.get("client"), request.args.get("name"))
        with leases.lock:
            pair = next_pair(queue, leases, who)
        shown = {"id": pair.id, "prompt": pair.prompt, "first": pair.first,
                 "second": pair.second} if pair else None  # fmt: skip
        return jsonify(pair=shown, progress=_progress(queue, who))

    @app.post("/api/label")
    def label() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "send a JSON object {client, name, pair, choice}")
        name, client = _name(body.get("name")), body.get("client")
        who = _who(client, name)
        choice, pair_id = body.get("choice"), body.get("pair")
        if choice not in (*CHOICES, SKIP):
            abort(400, f"choice must be one of {[*CHOICES, SKIP]}")
        with leases.lock:
            pairs = {p.id: p for p in queue.pending()}
            if pair_id not in pairs:
                abort(404, "no such pair in this run")
            votes = counted_labels([pairs[pair_id]], queue.labels())[pair_id]
            if any(v.who == who for v in votes):
                abort(409, "you have labelled this pair already")
            if len(votes) >= pairs[pair_id].needed:
                abort(409, "this pair has all its labels already (your hold on it had expired)")
            queue.give(pair_id, choice, name, client)
            leases.drop(pair_id, who)
        return jsonify(ok=True, progress=_progress(queue, who))

    @app.get("/api/progress")
    def progress() -> Response:
        return jsonify(_progress(queue, _who(request.args.get("client"), request.args.get("name"))))

    return app


def _name(raw: object) -> str | None:
    """An annotator's optional name: printable, at most MAX_NAME characters."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > MAX_NAME or not raw.isprintable():
        abort(400, f"name must be printable text of at most {MAX_NAME} characters")
    return raw.strip() or None


def _who(client: object, name: object) -> str:
    """The identity a request labels as (see bpo.human.Label.who)."""
    if not isinstance(client, str) or not CLIENT.fullmatch(client):
        abort(400, "client must be 8-64 letters, digits or dashes (the page makes one)")
    name = _name(name)
    return f"name:{name}" if name else f"client:{client}"


def _progress(queue: LabelQueue, who: str) -> dict:
    status = queue.status()
    status["mine"] = sum(label.who == who and label.choice != SKIP for label in queue.labels())
    return status


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
          lease_minutes: float = 10.0) -> None:  # fmt: skip
    """Serve the labelling page of `run_dir` until interrupted, printing its URL."""
    run_dir = Path(run_dir)
    check_human_run(run_dir)
    token = secrets.token_urlsafe(24)
    app = create_app(run_dir, token, lease_minutes * 60)
    try:  # werkzeug exits the process on a busy port; name the flag to change instead
        with socket.create_server((host, port), family=_family(host)):
            pass
    except OSError as e:
        raise ConfigError(
            f"--port: cannot listen on {host}:{port} ({e.strerror}); choose another --port"
        ) from None
    server = make_server(host, port, app, threaded=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    shown = f"[{host}]" if ":" in host else host
    print(f"Label the pairs of {run_dir} at http://{shown}:{server.server_port}/?token={token}")
    print("Keys: 1 / 2 the better response, t tie, s skip. Ctrl-C stops the server; every label "
          "given is on disk already.", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_human_run(run_dir: Path) -> None:
    """`run_dir` must be a run whose annotator is human (or hold a human queue already)."""
    import yaml

    if (run_dir / "human").is_dir():
        return
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"RUN_DIR: {run_dir} holds no run (no config.yaml); give the output_dir of a "
            "`bpo train` run with annotator.type=human"
        )
    kind = (yaml.safe_load(config.read_text(encoding="utf-8")).get("annotator") or {}).get("type")
    if kind != "human":
        raise ConfigError(
            f"RUN_DIR: the run in {run_dir} has annotator.type={kind}; only runs with "
            "annotator.type=human wait for labels"
        )
