"""The preference pool: annotated pairs on disk, popped without replacement (Algorithm 1, l. 12).

Each pair is appended to `pool.jsonl` (flushed and fsync'd) before training can use it, so a
crash loses no annotation. Pairs leave the pool in the order they entered; collection already
draws prompts at random.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from bpo.sequences import pack


@dataclass(frozen=True)
class PreferencePair:
    """One annotated pair (x, y_w, y_l) with log π_β of both responses, stored at collection."""

    prompt: str
    chosen: str
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    behavior_chosen_logp: float | None
    behavior_rejected_logp: float | None
    """None when no loss reads them: a reference other than the behavior, or BPO with K = 1 and
    one model, where π_β = π_θ at the pair's update and the update's own forward gives them."""
    phase: int
    margin: float
    """The annotator's preference strength for y_w over y_l (e.g. a reward difference)."""


@dataclass
class PairBatch:
    """B pairs laid out for one concatenated chosen+rejected forward pass."""

    pairs: list[PreferencePair]
    device: torch.device
    pad_id: int

    @cached_property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, attention mask (2B, P+R) and response mask (2B, R): chosen rows, then rejected."""
        prompts = [p.prompt_ids for p in self.pairs] * 2
        responses = [p.chosen_ids for p in self.pairs] + [p.rejected_ids for p in self.pairs]
        return pack(prompts, responses, self.pad_id, self.device)

    @cached_property
    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Response lengths in tokens of y_w and y_l, each (B,)."""
        chosen = torch.tensor([len(p.chosen_ids) for p in self.pairs], dtype=torch.float)
        rejected = torch.tensor([len(p.rejected_ids) for p in self.pairs], dtype=torch.float)
        return chosen.to(self.device), rejected.to(self.device)

    @property
    def behavior_chosen(self) -> torch.Tensor:
        return torch.tensor([p.behavior_chosen_logp for p in self.pairs])

    @property
    def behavior_rejected(self) -> torch.Tensor:
        return torch.tensor([p.behavior_rejected_logp for p in self.pairs])


class PreferencePool:
    """Durable FIFO of annotated pairs: `add` writes to disk first, `pop` never returns a pair
    twice. With `writer` False it only reads `path` (the pools of a multi-process run's other
    ranks, which hold the same pairs as the main one's, written by it)."""

    def __init__(self, path: str | Path | None, writer: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.writer = writer and path is not None
        self._pending: deque[PreferencePair] = deque()
        self.added = 0
        self.popped = 0

    def add(self, pairs: list[PreferencePair]) -> None:
        if self.writer:
            self._write(pairs)
        self._pending.extend(pairs)
        self.added += len(pairs)

    def _write(self, pairs: list[PreferencePair]) -> None:
        """Append the pairs in one write, then flush and fsync: a crash leaves at most the
        last record half-written, which `read` detects and drops."""
        append_records(self.path, [asdict(pair) for pair in pairs])

    def restore(self, added: int, popped: int) -> None:
        """Return to a checkpoint: the first `added` recorded pairs, `popped` of them used. Pairs
        recorded after the checkpoint are cut from the file (a resumed run collects them again,
        its annotations replayed)."""
        records = read_records(self.path, repair=True) if self.path.exists() else []
        if len(records) < added:
            raise ValueError(
                f"{self.path}: {len(records)} pairs, but the checkpoint had {added}; the pool "
                "file was changed or lost: restore it, or start a new output_dir"
            )
        if self.writer:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records[:added]), encoding="utf-8")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._pending = deque(PreferencePair(**r) for r in records[popped:added])
        self.added, self.popped = added, popped

    def pop(self, n: int) -> list[PreferencePair]:
        """The next n pairs, removed from the pool (Algorithm 1, lines 12–13)."""
        if n > len(self._pending):
            raise RuntimeError(
                f"preference pool: {n} pairs asked, {len(self._pending)} left; each phase must "
                "annotate M = K·B pairs"
            )
        self.popped += n
        return [self._pending.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._pending)

    @staticmethod
    def read(path: str | Path) -> list[PreferencePair]:
        """Every pair recorded in a pool file, in order (a half-written last record dropped with
        a warning)."""
        return [PreferencePair(**record) for record in read_records(path)]


class DiskFull(OSError):
    """No space left to record annotations: the run stops; what was written is whole."""


def append_records(path: Path, records: list[dict]) -> None:
    """Append JSON lines in one write, flushed and fsync'd before returning."""
    if not records:
        return
    data = "".join(json.dumps(r) + "\n" for r in records)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise DiskFull(
            errno.ENOSPC,
            f"disk full while appending to {path}: free space on its disk, then continue with "
            "`bpo train ... --resume` (a half-written record is dropped; every answer given "
            "before is in annotations.jsonl)",
        ) from None


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """The JSON lines of an append-only file. A last line without its newline is a record a
    crash cut short: dropped with a warning (and, with `repair`, cut from the file, so that the
    run that owns it appends cleanly). A bad line elsewhere is corruption: an error naming the
    file and the line."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {number} is not a JSON record ({e}); the file is corrupt: restore "
                "it from a copy or remove the line"
            ) from None
    if tail.strip():
        warnings.warn(
            f"{path}: dropped a half-written last record ({len(tail)} bytes; a crash cut it short)",
            stacklevel=2,
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
    return records
