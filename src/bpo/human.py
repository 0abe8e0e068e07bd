"""Human annotators (`annotator.type: human`): a run's pending pairs and their labels, on disk.

An annotation phase writes each batch of pairs the run asks about to `human/pending.jsonl`, the
two responses of a pair in a seeded random order, and waits until every pair has
`labels_per_pair` labels in `human/labels.jsonl`, given on `bpo annotate`'s page or imported from
a file; or it stops with `WaitingForLabels`, and `bpo train ... --resume` goes on once they are in.
Both files are append-only JSON lines; every record is fsync'd before the writer goes on, and an
advisory lock orders the writers (the run, the page's server, imports), so no label is lost.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from bpo.annotators import Annotator
from bpo.checks import ConfigError
from bpo.pool import append_records, read_records

CHOICES = ("first", "second", "tie")
"""A label's answer about the pair as shown: response 1 better, response 2 better, or a tie."""
SKIP = "skip"
"""A label that passes a pair on: it counts for nothing and comes back after the others."""
VOTE = {"first": 1, "second": -1, "tie": 0}
IMPORT_CHOICES = {"1": "first", "first": "first", "2": "second", "second": "second",
                  "t": "tie", "tie": "tie"}  # fmt: skip


class WaitingForLabels(Exception):
    """The phase's pairs are written and wait for labels; the run stops cleanly (wait=false)."""


@dataclass(frozen=True)
class PendingPair:
    """One pair as annotators see it: `first` and `second` are the run's a and b, swapped when
    `swapped`."""

    id: str
    batch: str
    prompt: str
    first: str
    second: str
    swapped: bool
    needed: int
    """Labels from different annotators that the pair needs (annotator.labels_per_pair)."""


@dataclass(frozen=True)
class Label:
    pair: str
    choice: str
    """One of CHOICES, or SKIP."""
    annotator: str | None
    """The name the annotator gave, if any."""
    client: str
    """Who gave it when no name is given: a page's session, or an imported file."""
    time: str

    @property
    def who(self) -> str:
        return identity(self.annotator, self.client)


def identity(annotator: str | None, client: str) -> str:
    """Who may label a pair once: the annotator's name, else the client (page session)."""
    return f"name:{annotator}" if annotator else f"client:{client}"


class LabelQueue:
    """The `human/` folder of a run directory: pending pairs, labels, and what they add up to."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.pending_path = self.folder / "pending.jsonl"
        self.labels_path = self.folder / "labels.jsonl"
        self._lock_path = self.folder / ".lock"

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the folder's advisory lock: one writer at a time; readers see whole records."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _append(self, path: Path, records: list[dict]) -> None:
        with self._locked(exclusive=True):
            if path.exists() and path.stat().st_size:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a writer killed mid-record: cut it off first
                        read_records(path, repair=True)
            append_records(path, records)

    def _read(self, path: Path) -> list[dict]:
        with self._locked(exclusive=False):
            return read_records(path) if path.exists() else []

    def pending(self) -> list[PendingPair]:
        """Every pair any phase of the run has asked about, in order."""
        return [PendingPair(**r) for r in self._read(self.pending_path)]

    def labels(self) -> list[Label]:
        """Every label given, in order, skips included."""
        return [Label(**r) for r in self._read(self.labels_path)]

    def add_batch(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], needed: int, seed: int
    ) -> list[PendingPair]:
        """The pairs of one annotator call, written unless an earlier call (or the run before a
        resume) wrote them. Ids and the shown order depend only on the content and `seed`."""
        content = json.dumps([list(prompts), list(a), list(b)], ensure_ascii=False)
        batch = hashlib.sha256(content.encode()).hexdigest()[:12]
        order = random.Random(f"{seed}:{batch}")
        pairs = []
        for i, (x, ya, yb) in enumerate(zip(prompts, a, b)):
            swapped = order.random() < 0.5
            first, second = (yb, ya) if swapped else (ya, yb)
            pairs.append(PendingPair(f"{batch}-{i}", batch, x, first, second, swapped, needed))
        if not any(p.batch == batch for p in self.pending()):
            self._append(self.pending_path, [asdict(p) for p in pairs])
        return pairs

    def give(self, pair: str, choice: str, annotator: str | None, client: str) -> Label:
        """Store one label durably (appended and fsync'd before this returns)."""
        if choice not in (*CHOICES, SKIP):
            raise ValueError(f"choice: {choice!r} is not one of {[*CHOICES, SKIP]}")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        label = Label(pair, choice, annotator or None, client, now)
        self._append(self.labels_path, [asdict(label)])
        return label

    def give_many(self, labels: list[Label]) -> None:
        """Store labels in one durable write (an import)."""
        self._append(self.labels_path, [asdict(label) for label in labels])

    def status(self, who: str | None = None) -> dict:
        """Progress over every pair asked so far, and the annotators' agreement; with `who`,
        also how many labels that identity gave (`mine`)."""
        pairs, labels = self.pending(), self.labels()
        mine = {"mine": sum(x.who == who and x.choice != SKIP for x in labels)} if who else {}
        counted = counted_labels(pairs, labels)
        complete = sum(len(counted[p.id]) >= p.needed for p in pairs)
        return {
            "pairs": len(pairs),
            "complete": complete,
            "waiting": len(pairs) - complete,
            "labels": sum(label.choice != SKIP for label in labels),
            "annotators": len({label.who for label in labels if label.choice != SKIP}),
            "by_annotator": dict(Counter(label.annotator or f"unnamed {label.client[:8]}"
                                         for label in labels if label.choice != SKIP)),
            **agreement(pairs, counted),
            **mine,
        }  # fmt: skip


def counted_labels(pairs: Sequence[PendingPair], labels: Sequence[Label]) -> dict[str, list[Label]]:
    """Per pair, the labels that count: the first `needed` non-skip labels from different
    annotators, in the order given (later ones, and an annotator's second, are ignored)."""
    needed = {p.id: p.needed for p in pairs}
    counted: dict[str, list[Label]] = {p.id: [] for p in pairs}
    for label in labels:
        votes = counted.get(label.pair)
        if label.choice == SKIP or votes is None or len(votes) >= needed[label.pair]:
            continue
        if all(v.who != label.who for v in votes):
            votes.append(label)
    return counted


def answer(pair: PendingPair, votes: Sequence[Label]) -> float:
    """The run's preference of its a over b, turned back from the shown order: the response more
    votes chose (a tie vote counts for neither), or 0 when they are even (annotator.ties then
    drops the pair or breaks the tie at random)."""
    total = sum(VOTE[v.choice] for v in votes)
    sign = float((total > 0) - (total < 0))
    return -sign if pair.swapped else sign


def agreement(pairs: Sequence[PendingPair], counted: dict[str, list[Label]]) -> dict:
    """Over pairs with at least two counted labels: the share where all agree, and Fleiss' kappa
    (chance-corrected; None when chance agreement is 1) over first / second / tie."""
    rows = [[v.choice for v in counted[p.id]] for p in pairs if len(counted[p.id]) >= 2]
    if not rows:
        return {}
    agreed = sum(len(set(r)) == 1 for r in rows) / len(rows)
    per_item, totals = [], dict.fromkeys(CHOICES, 0)
    for r in rows:
        n = len(r)
        counts = [r.count(c) for c in CHOICES]
        per_item.append((sum(c * c for c in counts) - n) / (n * (n - 1)))
        for c, k in zip(CHOICES, counts):
            totals[c] += k
    p_bar = sum(per_item) / len(rows)
    grand = sum(totals.values())
    p_chance = sum((k / grand) ** 2 for k in totals.values())
    kappa = None if p_chance == 1 else (p_bar - p_chance) / (1 - p_chance)
    return {"pairs_labelled_twice": len(rows), "agreement": agreed, "kappa": kappa}


class HumanAnnotator(Annotator):
    """People annotate each pair (Algorithm 1: (y_w, y_l) ← annotate(x, y1, y2)) through the
    run directory's `human/` queue.

    `compare` writes the call's pairs and waits for their labels, polling every `poll_seconds`;
    with `wait` False it raises WaitingForLabels instead, and the resumed run asks again. Each
    answer is +1 (a), −1 (b) or 0 (a tie, or annotators split evenly).
    """

    def __init__(
        self,
        folder: str | Path,
        labels_per_pair: int,
        wait: bool,
        seed: int,
        run_dir: str | Path,
        poll_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        self.queue = LabelQueue(folder)
        self.labels_per_pair, self.wait, self.seed = labels_per_pair, wait, seed
        self.run_dir, self.poll_seconds = run_dir, poll_seconds

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        pairs = self.queue.add_batch(prompts, a, b, self.labels_per_pair, self.seed)
        bar = None
        try:
            while True:
                counted = counted_labels(pairs, self.queue.labels())
                given = sum(len(counted[p.id]) for p in pairs)
                if given == self.labels_per_pair * len(pairs):
                    return [answer(p, counted[p.id]) for p in pairs]
                if not self.wait:
                    raise WaitingForLabels(self._instructions(len(pairs), given))
                if bar is None:
                    tqdm.write(self._instructions(len(pairs), given))
                    bar = tqdm(total=self.labels_per_pair * len(pairs), desc="labels", leave=False)
                bar.update(given - bar.n)
                time.sleep(self.poll_seconds)
        finally:
            if bar is not None:
                bar.close()

    def _instructions(self, n_pairs: int, given: int) -> str:
        return (
            f"{n_pairs} pairs wait for labels ({given} of {self.labels_per_pair * n_pairs} "
            f"given): label them with `bpo annotate {self.run_dir}`, or export them with "
            f"`bpo annotate {self.run_dir} --export FILE` and import the labels with "
            f"`bpo annotate {self.run_dir} --import FILE`"
            + ("" if self.wait else "; then continue the run with the same command and --resume")
        )

    def report(self) -> dict:
        """What the people gave over the run, for summary.json."""
        status = self.queue.status()
        return {f"human_{k}": v for k, v in status.items() if k not in ("waiting", "complete")}


class SampleStore:
    """The responses a human run sampled for each round of a phase, kept in `folder` before people
    are asked about them: a resumed run takes them back instead of sampling again, so it asks
    the same questions even where sampling does not repeat exactly (vLLM, GPU kernels), and the
    labels already given still answer them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def stored(self, seed: int, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]] | None:
        """The responses kept for the draw from `seed` for `prompt_ids`, or None."""
        path = self._path(seed)
        if not path.exists():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored["samples"] if stored["prompt_ids"] == [list(p) for p in prompt_ids] else None

    def keep(
        self, seed: int, prompt_ids: Sequence[Sequence[int]], samples: list[list[int]]
    ) -> None:
        """Store the draw (atomically, synced) before anyone is asked about it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(seed)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"prompt_ids": [list(p) for p in prompt_ids], "samples": samples}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _path(self, seed: int) -> Path:
        return self.folder / f"samples-{seed}.json"


def export_pending(queue: LabelQueue, path: str | Path) -> int:
    """Write the pairs that still need labels to a .csv or .jsonl file (columns pair_id, prompt,
    response_1, response_2, labels_needed) for an external labelling tool; return how many."""
    pairs, labels = queue.pending(), queue.labels()
    counted = counted_labels(pairs, labels)
    rows = [
        {"pair_id": p.id, "prompt": p.prompt, "response_1": p.first, "response_2": p.second,
         "labels_needed": p.needed - len(counted[p.id])}
        for p in pairs if len(counted[p.id]) < p.needed
    ]  # fmt: skip
    path = Path(path)
    _check_suffix(path, "--export")
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(PENDING_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


PENDING_COLUMNS = ("pair_id", "prompt", "response_1", "response_2", "labels_needed")


def import_labels(queue: LabelQueue, path: str | Path, annotator: str | None = None) -> dict:
    """Add the labels of a .csv or .jsonl file with columns pair_id and choice (1, 2, tie; or
    first, second) and optionally annotator; `annotator` names the rows without one. Labels for
    pairs that have all theirs already are counted and left out. A bad row stops the import
    before anything is written, naming the file, the row and the value."""
    path = Path(path)
    _check_suffix(path, "--import")
    if not path.is_file():
        raise FileNotFoundError(f"--import: no file at {path}")
    pairs = {p.id: p for p in queue.pending()}
    counted = {k: len(v) for k, v in counted_labels(list(pairs.values()), queue.labels()).items()}
    seen = {(label.pair, label.who) for label in queue.labels() if label.choice != SKIP}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    new, repeated, complete = [], 0, 0
    for where, row in _rows(path):
        pair_id, choice = str(row.get("pair_id") or ""), str(row.get("choice") or "")
        if pair_id not in pairs:
            raise ConfigError(
                f"{where}: pair_id {pair_id!r} is not a pair of this run; export the pending "
                "pairs with --export and keep their pair_id column"
            )
        if choice.strip().lower() not in IMPORT_CHOICES:
            raise ConfigError(
                f"{where}: choice {choice!r} is not one of 1, 2, tie (or first, second)"
            )
        name = str(row.get("annotator") or annotator or "") or None
        if name is None and pairs[pair_id].needed > 1:
            raise ConfigError(
                f"{where}: the pair needs {pairs[pair_id].needed} labels from different people, "
                "and this row does not say whose it is; add an annotator column or --annotator NAME"
            )
        label = Label(pair_id, IMPORT_CHOICES[choice.strip().lower()], name,
                      f"import:{path.name}", now)  # fmt: skip
        if (pair_id, label.who) in seen:
            repeated += 1
        elif counted[pair_id] >= pairs[pair_id].needed:
            complete += 1
        else:
            seen.add((pair_id, label.who))
            counted[pair_id] += 1
            new.append(label)
    queue.give_many(new)
    return {"imported": len(new), "already_given": repeated, "pair_complete": complete,
            **queue.status()}  # fmt: skip


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a .csv (a spreadsheet's byte-order mark allowed) or .jsonl file."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix == ".csv":
            for number, row in enumerate(csv.DictReader(f), start=2):
                yield f"{path}, row {number}", row
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: not a JSON object with pair_id and choice")
            yield where, row


def _check_suffix(path: Path, flag: str) -> None:
    if path.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{flag}: {path} must end in .csv or .jsonl")
