"""The paper's datasets as tasks (arXiv 2406.12168): Reddit TL;DR and Anthropic HH (helpful-base,
harmless-base), loaded with `datasets.load_dataset`.

Sets: the train split's rows are shuffled with `random.Random(task.seed)`; its first n_align
distinct prompts are the alignment prompts, the next n_sft rows (None: all the rest) with another
prompt the SFT demonstrations, the human response their target. The eval set is the first n_eval
distinct prompts of the eval split, in order, the human response their reference. No prompt is in
two sets: train rows sharing a prompt with the eval set are left out (counted and warned of).

Source: `task.dataset` is a Hub id or a local folder, loaded with `load_dataset(path, data_dir=...)`
(a folder's splits are named from its file names, e.g. train.jsonl, test.jsonl; datasets names
valid.jsonl "validation"), or one data file (.json, .jsonl, .csv, optionally .gz, or .parquet),
loaded as the single split "train". When train_split == eval_split (with one file: set
task.eval_split=train) the eval set is the first n_eval distinct prompts of that split and the
SFT and alignment sets come from its other rows.

Truncation (`task.max_prompt_tokens`): a TL;DR prompt keeps its header fields, the start of its
post and "TL;DR:"; an HH prompt keeps the end of the conversation (whole earliest turns go first,
then words from the start of the last human turn). Only the rows drawn are tokenized.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetsError
from transformers import PreTrainedTokenizerBase

from bpo.checks import ConfigError
from bpo.tasks import Example, Task

if TYPE_CHECKING:
    from bpo.config import TaskConfig

POST = "POST:"
TLDR = "TL;DR:"
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"(?=\n\nHuman:|\n\nAssistant:)")  # splits a transcript before each marker
_WORD = re.compile(r"\S+")
_CHUNK = 1024  # texts per tokenizer call
_INTERPOLATED = 4  # steps of a prompt's cut search that interpolate before bisecting

# A shortening plan of a prompt: (top, cut); cut(0) is the prompt, cut(level) cuts more as the
# level rises, cut(top) as far as the format allows.
Plan = tuple[int, Callable[[int], str]]


@dataclass(frozen=True)
class _Row:
    """A usable row of a split: its index there, the prompt and the human response."""

    index: int
    prompt: str
    response: str


# --- the two layouts ----------------------------------------------------------------------------


def _parse_tldr(prompt: str, label: str) -> tuple[str, str]:
    """The prompt in the paper's Table 3 format, "SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:"
    (the fields on their own lines as in the data), and the human summary."""
    prompt = prompt.rstrip()
    if POST not in prompt:
        raise ConfigError(f"the prompt has no {POST!r} field: {prompt[:80]!r}")
    if not prompt.endswith(TLDR):
        raise ConfigError(f"the prompt does not end with {TLDR!r}: ...{prompt[-80:]!r}")
    return prompt, label


def _parse_hh(chosen: str) -> tuple[str, str]:
    """The transcript up to and including its last "\\n\\nAssistant:", and the reply after it."""
    at = chosen.rfind(ASSISTANT)
    if at < 0:
        raise ConfigError(f"the transcript has no {ASSISTANT!r} turn: {chosen[:80]!r}")
    end = at + len(ASSISTANT)
    return chosen[:end], chosen[end:]


def _shorten_tldr(prompt: str) -> Plan:
    """Cuts that keep the start of the post: level L drops its last L words, keeping the header
    fields, "POST:" and "TL;DR:"."""
    at = prompt.index(POST) + len(POST)
    body = prompt[at : len(prompt) - len(TLDR)]  # " <post>\n"
    ends = [m.end() for m in _WORD.finditer(body)]
    sep = body[len(body.rstrip()) :]

    def cut(level: int) -> str:
        keep = len(ends) - level
        return prompt[:at] + (body[: ends[keep - 1]] if keep else "") + sep + TLDR

    return len(ends), cut


def _shorten_hh(prompt: str) -> Plan:
    """Cuts that keep the end of the conversation: the first levels drop whole earliest turns
    (the prompt then starts at a later "\\n\\nHuman:"), the next ones words from the start of the
    last human turn, keeping its marker and the final "\\n\\nAssistant:"."""
    chunks = [c for c in _TURN.split(prompt) if c]
    humans = [i for i, c in enumerate(chunks) if c.startswith(HUMAN)]
    if not humans:
        return 0, lambda level: prompt
    starts = [i for i in humans if i > 0]  # level k in 1..len(starts) starts at chunk starts[k-1]
    last, tail = chunks[humans[-1]][len(HUMAN) :], "".join(chunks[humans[-1] + 1 :])
    words = [m.start() for m in _WORD.finditer(last)]

    def cut(level: int) -> str:
        if level <= len(starts):
            return "".join(chunks[starts[level - 1] :]) if level else prompt
        dropped = level - len(starts)  # words cut from the last human turn, 1..len(words)
        return HUMAN + " " + (last[words[dropped] :] if dropped < len(words) else "") + tail

    return len(starts) + len(words), cut


@dataclass(frozen=True)
class _Layout:
    """Where a dataset lives by default and how its rows are read and shortened."""

    dataset: str
    data_dir: str | None
    columns: tuple[str, ...]  # TaskConfig fields naming the columns read; parse takes them in order
    parse: Callable[..., tuple[str, str]]  # column values -> (prompt, reply)
    shorten: Callable[[str], Plan]
    keeps: str  # what a cut always keeps, for messages


_HH_HELPFUL = _Layout(
    "Anthropic/hh-rlhf",
    "helpful-base",
    ("chosen_column",),
    _parse_hh,
    _shorten_hh,
    "the end of the conversation; the last '\\n\\nHuman: ' and '\\n\\nAssistant:' are kept",
)
LAYOUTS = {
    "tldr": _Layout(
        "CarperAI/openai_summarize_tldr",
        None,
        ("prompt_column", "label_column"),
        _parse_tldr,
        _shorten_tldr,
        "the start of the post; the SUBREDDIT and TITLE fields, 'POST:' and 'TL;DR:' are kept",
    ),
    "hh_helpful": _HH_HELPFUL,
    "hh_harmless": replace(_HH_HELPFUL, data_dir="harmless-base"),
}
_HOLDS = {  # what each column field names, for messages
    "prompt_column": 'the "SUBREDDIT: ... TL;DR:" prompt',
    "label_column": "the human summary",
    "chosen_column": 'the preferred "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript',
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}  # these also as .gz


# --- loading ------------------------------------------------------------------------------------


def _builder(path: Path) -> str:
    """`load_dataset`'s builder for a data file, by its extension."""
    name = path.name.lower()
    builders = _FILE_BUILDERS if name.endswith(".gz") else {**_FILE_BUILDERS, ".parquet": "parquet"}
    ext = Path(name.removesuffix(".gz")).suffix
    if ext not in builders:
        raise ConfigError(
            f"task.dataset={str(path)!r}: a data file must be .json, .jsonl or .csv (each "
            "optionally .gz) or .parquet; convert it, or give its folder"
        )
    return builders[ext]


def _looks_local(path: str) -> bool:
    """Whether `path` can only mean a local file or folder (a Hub id is "name" or "owner/name")."""
    ext = Path(path.removesuffix(".gz")).suffix
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or ext in {*_FILE_BUILDERS, ".parquet"}
    )


def _load(cfg: TaskConfig, layout: _Layout) -> DatasetDict:
    """All splits of the dataset `task.dataset` names (see the module docstring)."""
    path = cfg.dataset or layout.dataset
    local = Path(path).expanduser()
    if local.is_file():
        if cfg.data_dir is not None:
            raise ConfigError(
                f"task.data_dir={cfg.data_dir!r}: task.dataset={path!r} is a data file, which has "
                "no data_dir; remove task.data_dir or point task.dataset at the folder"
            )
        return _load_dataset(path, _builder(local), data_files=str(local))
    if not local.exists() and _looks_local(path):
        raise ConfigError(
            f"task.dataset={path!r}: no such file or folder; give a Hub id (owner/name), a local "
            "folder or a data file (.json/.jsonl/.csv/.parquet)"
        )
    data_dir = cfg.data_dir if cfg.data_dir is not None else layout.data_dir
    where = str(local) if local.exists() else path  # a folder, or a Hub id
    return _load_dataset(path, where, **({"data_dir": data_dir} if data_dir else {}))


def _load_dataset(path: str, *args: str, **kwargs: str) -> DatasetDict:
    """`load_dataset(*args, **kwargs)`, its failures told as errors of `task.dataset`."""
    try:
        return load_dataset(*args, **kwargs)
    except (OSError, ValueError, DatasetsError) as e:  # missing files, unreachable Hub, bad data
        where = f" (data_dir={kwargs['data_dir']!r})" if "data_dir" in kwargs else ""
        raise ConfigError(
            f"task.dataset={path!r}{where}: load_dataset failed: {e}; give a Hub id, a local "
            "folder or a data file, and check task.data_dir"
        ) from e


def _split(splits: DatasetDict, name: str, field: str, path: str) -> Dataset:
    """The split `name` (the value of `task.<field>`), or an error listing the splits there are."""
    if name in splits:
        return splits[name]
    hint = ""
    if list(splits) == ["train"]:
        hint = " (a data file is the one split 'train': set task.eval_split=train to hold out "
        hint += "its first rows for evaluation)"
    raise ConfigError(
        f"task.{field}={name!r}: {path} has no split {name!r}; its splits: {', '.join(splits)}; "
        f"set task.{field} to one of them{hint}"
    )


def _rows(ds: Dataset, split: str, cfg: TaskConfig, layout: _Layout) -> list[_Row]:
    """The split's rows as (prompt, " " + reply.strip()); rows with an empty reply are skipped,
    counted and warned of; a malformed row is an error naming the split, the row and the column."""
    columns = [getattr(cfg, f) for f in layout.columns]
    for f, column in zip(layout.columns, columns):
        if column not in ds.column_names:
            raise ConfigError(
                f"task.{f}={column!r}: split {split!r} has no column {column!r}; its columns: "
                f"{', '.join(ds.column_names)}; set task.{f} to the column holding {_HOLDS[f]}"
            )
    rows, empty = [], 0
    for i, values in enumerate(zip(*(ds[c][:] for c in columns))):  # [:]: lists, fast
        try:
            if not all(isinstance(v, str) for v in values):
                raise ConfigError(f"a value is not text: {values!r}")
            if not values[0].strip():
                raise ConfigError("the prompt is empty")
            prompt, reply = layout.parse(*values)
        except ValueError as e:
            f = layout.columns[0]
            raise ConfigError(
                f"task.{f}={columns[0]!r}: split {split!r} row {i}: {e}; fix the row, or point "
                f"task.dataset at data in the {cfg.name} layout"
            ) from None
        if reply.strip():
            rows.append(_Row(i, prompt, " " + reply.strip()))
        else:
            empty += 1
    if empty:
        warnings.warn(
            f"task.dataset: skipped {empty} of the {len(ds)} rows of split {split!r} whose reply "
            f"(in column {columns[-1]!r}) is empty",
            stacklevel=5,  # _rows < _read < load_dataset_task < load_task < its caller
        )
    return rows


# --- fitting prompts to task.max_prompt_tokens --------------------------------------------------


class _Fit:
    """Fits prompts to `task.max_prompt_tokens` (counted with the policy's tokenizer, special
    tokens included): a longer prompt is cut as its layout says, or rejected
    (`task.long_prompts=error`). Each prompt is fitted once."""

    def __init__(self, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase | None, layout: _Layout):
        self.limit, self.mode, self.layout = cfg.max_prompt_tokens, cfg.long_prompts, layout
        self.tokenizer = tokenizer
        self.fitted: dict[str, str] = {}

    def __call__(self, rows: Sequence[_Row], split: str) -> list[str]:
        """The rows' prompts, fitted."""
        if self.limit is None:
            return [r.prompt for r in rows]
        new = list({r.prompt: r for r in rows if r.prompt not in self.fitted}.values())
        long, lengths = [], []
        for row, n in zip(new, self._lengths([r.prompt for r in new])):
            if n <= self.limit:
                self.fitted[row.prompt] = row.prompt
            elif self.mode == "error":
                raise ConfigError(
                    f"task.max_prompt_tokens={self.limit}: split {split!r} row {row.index} has a "
                    f"{n}-token prompt (task.long_prompts=error); raise task.max_prompt_tokens or "
                    "set task.long_prompts=truncate"
                )
            else:
                long.append(row)
                lengths.append(n)
        for row, prompt in zip(long, self._cut(long, lengths, split)):
            self.fitted[row.prompt] = prompt
        return [self.fitted[r.prompt] for r in rows]

    def _lengths(self, texts: list[str]) -> list[int]:
        """Token counts, from batched tokenizer calls (in chunks, to bound the memory the ids
        take)."""
        lengths = []
        for at in range(0, len(texts), _CHUNK):
            ids = self.tokenizer(texts[at : at + _CHUNK], add_special_tokens=True)["input_ids"]
            lengths += [len(i) for i in ids]
        return lengths

    def _cut(self, rows: list[_Row], lengths: list[int], split: str) -> list[str]:
        """The least cut of each prompt that fits (`lengths`: the prompts' token counts): a search
        over its plan's levels, all rows in step, one batched tokenizer call per step. The first
        `_INTERPOLATED` steps probe the level that interpolates the limit between the bracket's
        ends by length in characters (tokens grow about linearly with characters, so a few steps
        usually end the search); bisection finishes what they leave."""
        plans = [self.layout.shorten(r.prompt) for r in rows]
        hi = [top for top, _ in plans]  # the least level known to fit, n_hi tokens long
        n_hi = self._lengths([cut(top) for top, cut in plans])
        for row, n in zip(rows, n_hi):
            if n > self.limit:
                raise ConfigError(
                    f"task.max_prompt_tokens={self.limit}: split {split!r} row {row.index}: the "
                    f"prompt is {n} tokens even cut as far as it goes ({self.layout.keeps}); "
                    "raise task.max_prompt_tokens"
                )
        lo, n_lo = [1] * len(rows), list(lengths)  # level lo - 1 is too long, n_lo tokens long
        step = 0
        while active := [i for i in range(len(rows)) if lo[i] < hi[i]]:
            probe = {
                i: self._interpolate(plans[i][1], lo[i], hi[i], n_lo[i], n_hi[i])
                if step < _INTERPOLATED
                else (lo[i] + hi[i]) // 2
                for i in active
            }
            for i, n in zip(active, self._lengths([plans[i][1](probe[i]) for i in active])):
                if n <= self.limit:
                    hi[i], n_hi[i] = probe[i], n
                else:
                    lo[i], n_lo[i] = probe[i] + 1, n
            step += 1
        return [cut(level) for (_, cut), level in zip(plans, hi)]

    def _interpolate(
        self, cut: Callable[[int], str], lo: int, hi: int, n_lo: int, n_hi: int
    ) -> int:
        """The least level in [lo, hi - 1] no longer, in characters, than the limit interpolated
        linearly between level lo - 1 (n_lo tokens) and level hi (n_hi tokens)."""
        c_lo, c_hi = len(cut(lo - 1)), len(cut(hi))
        target = c_hi + (c_lo - c_hi) * (self.limit - n_hi) / (n_lo - n_hi)  # n_lo > limit >= n_hi
        a, b = lo, hi - 1
        while a < b:
            m = (a + b) // 2
            if len(cut(m)) <= target:
                b = m
            else:
                a = m + 1
        return a


# --- the sets -----------------------------------------------------------------------------------


def _draw(
    rows: Sequence[_Row], n: int | None, taken: set[str], fit: _Fit, split: str, distinct: bool
) -> tuple[list[tuple[_Row, str]], int]:
    """The first n rows (None: all) whose fitted prompt is not in `taken` (nor, if `distinct`,
    drawn before), with their fitted prompts, and how many of those were cut. Fits in batches of
    the rows still needed, so only the rows drawn are tokenized."""
    drawn: list[tuple[_Row, str]] = []
    seen, at, cut = set(taken), 0, 0
    while at < len(rows) and (n is None or len(drawn) < n):
        batch = rows[at : len(rows) if n is None else at + n - len(drawn)]
        at += len(batch)
        batch = [r for r in batch if r.prompt not in seen]  # a prompt that fits is its own fit
        for row, prompt in zip(batch, fit(batch, split)):
            if prompt not in seen:
                drawn.append((row, prompt))
                cut += prompt != row.prompt
                if distinct:
                    seen.add(prompt)
    return drawn, cut


def _enough(cfg: TaskConfig, field: str, got: int, available: str) -> None:
    """An error when `task.<field>` asks for more than the `got` the data hold."""
    asked = getattr(cfg, field)
    if asked is not None and got < asked:
        raise ConfigError(
            f"task.{field}={asked}: asks for more than the data hold: {got} {available}; lower "
            f"task.{field}" + (" or set it to null (all of them)" if field == "n_sft" else "")
        )


def _check(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Set sizes and the token limit that can run."""
    for field in ("n_sft", "n_align", "n_eval"):
        value = getattr(cfg, field)
        if value is not None and value < 0:
            raise ConfigError(f"task.{field}: must be >= 0, got {value}")
    if cfg.max_prompt_tokens is not None:
        if cfg.max_prompt_tokens < 1:
            raise ConfigError(
                f"task.max_prompt_tokens: must be >= 1 or null (no limit), got "
                f"{cfg.max_prompt_tokens}"
            )
        if tokenizer is None:
            raise ConfigError(
                f"task.max_prompt_tokens={cfg.max_prompt_tokens} counts the policy's tokens: pass "
                "its tokenizer, load_task(cfg, tokenizer), or set task.max_prompt_tokens=null"
            )


def _read(cfg: TaskConfig, layout: _Layout) -> tuple[list[_Row], list[_Row]]:
    """The rows of the train split and of the eval split (the same list when they are one)."""
    path = cfg.dataset or layout.dataset
    splits = _load(cfg, layout)
    train_ds = _split(splits, cfg.train_split, "train_split", path)
    eval_ds = _split(splits, cfg.eval_split, "eval_split", path)
    train = _rows(train_ds, cfg.train_split, cfg, layout)
    if cfg.eval_split == cfg.train_split:
        return train, train
    return train, _rows(eval_ds, cfg.eval_split, cfg, layout)


def _pool(cfg: TaskConfig, train: list[_Row], held: list[tuple[_Row, str]]) -> list[_Row]:
    """The train rows the SFT and alignment sets are drawn from, shuffled with `task.seed`: all
    but the eval rows and the rows sharing a prompt with them (counted and warned of)."""
    held_prompts = {row.prompt for row, _ in held}
    held_rows = {row.index for row, _ in held} if cfg.eval_split == cfg.train_split else set()
    pool = [r for r in train if r.index not in held_rows]
    overlap = sum(r.prompt in held_prompts for r in pool)
    if overlap:
        warnings.warn(
            f"task.train_split={cfg.train_split!r}: left out {overlap} rows whose prompt is an "
            "eval prompt (no prompt is in two sets)",
            stacklevel=4,
        )
    pool = [r for r in pool if r.prompt not in held_prompts]
    random.Random(cfg.seed).shuffle(pool)
    return pool


def load_dataset_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> Task:
    """The dataset task `cfg.name` (tldr, hh_helpful, hh_harmless), split into disjoint SFT,
    alignment and eval sets as the module docstring says; `tokenizer` (the policy's) counts
    prompt tokens for `task.max_prompt_tokens`."""
    layout = LAYOUTS[cfg.name]
    _check(cfg, tokenizer)
    train, held_out = _read(cfg, layout)
    fit = _Fit(cfg, tokenizer, layout)
    train_split, eval_split = cfg.train_split, cfg.eval_split

    held, cut_eval = _draw(held_out, cfg.n_eval, set(), fit, eval_split, distinct=True)
    _enough(cfg, "n_eval", len(held), f"distinct prompts in split {eval_split!r}")
    pool = _pool(cfg, train, held)
    taken = {prompt for _, prompt in held}
    align, cut_align = _draw(pool, cfg.n_align, taken, fit, train_split, distinct=True)
    _enough(cfg, "n_align", len(align), f"distinct prompts outside the eval set in {train_split!r}")
    taken |= {prompt for _, prompt in align}
    sft, cut_sft = _draw(pool, cfg.n_sft, taken, fit, train_split, distinct=False)
    _enough(cfg, "n_sft", len(sft), f"rows with a prompt in no other set in {train_split!r}")

    truncated = cut_sft + cut_align + cut_eval
    if truncated:
        warnings.warn(
            f"task.max_prompt_tokens={cfg.max_prompt_tokens}: truncated {cut_sft} of the "
            f"{len(sft)} sft / {cut_align} of the {len(align)} alignment / {cut_eval} of the "
            f"{len(held)} eval prompts (keeping {layout.keeps})",
            stacklevel=3,
        )
    return Task(
        name=cfg.name,
        sft=[Example(prompt, row.response) for row, prompt in sft],
        align_prompts=[prompt for _, prompt in align],
        eval=[Example(prompt, row.response) for row, prompt in held],
        reward=None,
        truncated=truncated,
    )
