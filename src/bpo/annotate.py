"""`bpo annotate RUN_DIR`: a local web page on which people label a run's pending pairs.

A Flask app over the run's `human/` queue (bpo.human). Each annotator (a page session, or a
name) is handed pairs it has not labelled, held for it for `lease_seconds` so that no one else
gets them while it decides; a pair reaches a second annotator only when `labels_per_pair` asks
for it. A label is on disk (fsync'd) before the page hears back. Every request must carry the
session token printed in the URL; the page shows prompts and responses as text only; request
sizes are bounded; the app reads and writes the run's `human/` folder and nothing else.
"""

from __future__ import annotations

import fcntl
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
from werkzeug.serving import WSGIRequestHandler, make_server

from bpo.checks import ConfigError
from bpo.human import CHOICES, SKIP, LabelQueue, PendingPair, counted_labels, identity

MAX_REQUEST_BYTES = 4096
"""Largest request body accepted (a label is ~200 bytes)."""
MAX_QUERY_BYTES = 1024
CLIENT = re.compile(r"[A-Za-z0-9-]{8,64}")
MAX_NAME = 64


class Leases:
    """Which page session (client) holds which pair, for whom, until when; in memory (a restarted
    server forgets them, which only frees pairs sooner). A client holds one pair at a time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.held: dict[str, tuple[str, str, float]] = {}  # client -> (pair, who, expiry)
        self.lock = threading.Lock()

    def holders(self, now: float) -> dict[str, list[tuple[str, str]]]:
        """pair -> [(client, who)] of the leases still running; expired ones are forgotten."""
        self.held = {c: lease for c, lease in self.held.items() if lease[2] > now}
        out: dict[str, list[tuple[str, str]]] = {}
        for client, (pair, who, _) in self.held.items():
            out.setdefault(pair, []).append((client, who))
        return out

    def take(self, pair: str, client: str, who: str, now: float) -> None:
        self.held[client] = (pair, who, now + self.seconds)

    def drop(self, client: str) -> None:
        self.held.pop(client, None)


def next_pair(queue: LabelQueue, leases: Leases, client: str, who: str) -> PendingPair | None:
    """The pair the page session `client` (labelling as `who`) should label next, leased to it:
    the one it holds, else the first that needs labels, that `who` has not labelled, that `who`
    does not hold in another tab, and that other annotators' leases do not cover; pairs `who`
    skipped come last. Call with `leases.lock` held."""
    pairs, labels = queue.pending(), queue.labels()
    counted = counted_labels(pairs, labels)
    skipped = {label.pair for label in labels if label.who == who and label.choice == SKIP}
    now = time.monotonic()
    holders = leases.holders(now)
    candidates = []
    for order, pair in enumerate(pairs):
        votes, held = counted[pair.id], holders.get(pair.id, [])
        if len(votes) >= pair.needed or any(v.who == who for v in votes):
            continue
        mine = any(c == client for c, _ in held)
        others = {w for c, w in held if c != client}
        if not mine and (who in others or len(votes) + len(others) >= pair.needed):
            continue  # this person has it open elsewhere, or enough others are on it
        candidates.append((not mine, pair.id in skipped, order, pair))
    leases.drop(client)
    if not candidates:
        return None
    pair = min(candidates, key=lambda c: c[:3])[3]
    leases.take(pair.id, client, who, now)
    return pair


def create_app(
    run_dir: str | Path, token: str, lease_seconds: float = 600.0, guidelines: str = ""
) -> Flask:
    """The labelling app of the run in `run_dir`, showing `guidelines` (plain text) above each
    pair; every request must carry `token`."""
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
        return render_template_string(
            page, nonce=g.nonce, run=Path(run_dir).name, guidelines=guidelines
        )

    @app.get("/api/next")
    def next_() -> Response:
        client = request.args.get("client")
        who = _who(client, request.args.get("name"))
        with leases.lock:
            pair = next_pair(queue, leases, client, who)
        shown = {"id": pair.id, "prompt": pair.prompt, "first": pair.first,
                 "second": pair.second} if pair else None  # fmt: skip
        return jsonify(pair=shown, progress=queue.status(who))

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
            leases.drop(client)
        return jsonify(ok=True, progress=queue.status(who))

    @app.get("/api/progress")
    def progress() -> Response:
        return jsonify(queue.status(_who(request.args.get("client"), request.args.get("name"))))

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
    return identity(_name(name), client)


class _Handler(WSGIRequestHandler):
    timeout = 60  # seconds a connection may sit idle, so idle ones cannot pile up threads


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
          lease_minutes: float = 10.0, guidelines: str | Path | None = None) -> None:  # fmt: skip
    """Serve the labelling page of `run_dir` until interrupted, printing its URL; `guidelines`,
    a text file, is shown to the annotators. One server per run: a second would hand the same
    pairs out again."""
    run_dir = Path(run_dir)
    check_human_run(run_dir)
    text = read_guidelines(guidelines) if guidelines else ""
    (run_dir / "human").mkdir(exist_ok=True)
    with open(run_dir / "human" / ".server.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"RUN_DIR: another `bpo annotate` serves {run_dir} already; label on its page "
                "(the URL it printed), or stop it first"
            ) from None
        try:  # werkzeug exits the process on a busy port; name the flag to change instead
            with socket.create_server((host, port), family=_family(host)):
                pass
        except OSError as e:
            raise ConfigError(
                f"--port: cannot listen on {host}:{port} ({e.strerror}); choose another --port"
            ) from None
        token = secrets.token_urlsafe(24)
        app = create_app(run_dir, token, lease_minutes * 60, text)
        server = make_server(host, port, app, threaded=True, request_handler=_Handler)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        shown = f"[{host}]" if ":" in host else host
        print(f"Label the pairs of {run_dir} at http://{shown}:{server.server_port}/?token={token}")
        print("Keys: 1 / 2 the better response, t tie, s skip. Ctrl-C stops the server; every "
              "label given is on disk already.", flush=True)  # fmt: skip
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"Warning: listening on {host}, beyond this machine, over plain HTTP: anyone on "
                  "the network who sees the URL can label. Use it on a trusted network only.",
                  flush=True)  # fmt: skip
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


MAX_GUIDELINES = 20_000


def read_guidelines(path: str | Path) -> str:
    """The annotators' guidelines: a UTF-8 text file of at most MAX_GUIDELINES characters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--guidelines: no file at {path}")
    text = path.read_text(encoding="utf-8")
    if len(text) > MAX_GUIDELINES:
        raise ConfigError(
            f"--guidelines: {path} has {len(text)} characters, more than {MAX_GUIDELINES}; "
            "shorten it (the page shows it above every pair)"
        )
    return text


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
