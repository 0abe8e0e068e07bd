"""Digest: a word-level TL;DR stand-in small enough to train on a CPU.

A post is a shuffled bag of words in which 2-4 *key* topic words recur with distinct counts,
1-3 *distractor* topic words occur once, and the rest is filler. The ideal summary lists the key
words, most frequent first, and ends with `.`. The gold reward scores a summary against that
ideal from the prompt alone, so annotators and evaluation need no stored labels.
"""

from __future__ import annotations

import random
from collections import Counter

from transformers import PreTrainedTokenizerFast

from bpo.tasks import Task, draw_task, wordlevel

TOPIC_WORDS = tuple(
    "rent landlord lease roommate neighbor house job boss interview school exam teacher "
    "cat dog vet doctor car phone loan bank money wedding party friend "
    "girlfriend boyfriend sister brother mom dad".split()
)
FILLER_WORDS = tuple(
    "i the a my and was to it so but he she we they is of in on that this "
    "with for about then just now after when really not".split()
)
PROMPT_END = "tl;dr:"
SUMMARY_END = "."
WORDS = TOPIC_WORDS + FILLER_WORDS + (PROMPT_END, SUMMARY_END)
VOCAB = wordlevel.SPECIAL_TOKENS + WORDS

_TOPICS = frozenset(TOPIC_WORDS)
POST_LENGTH = (24, 48)  # words, drawn uniformly
KEY_COUNTS = range(2, 7)  # each key word's count, distinct within a post


def _topics(prompt: str) -> tuple[list[str], list[str]]:
    """Key words (count >= 2, most frequent first) and distractors (count 1) of a prompt."""
    counts = Counter(w for w in prompt.split() if w in _TOPICS)
    keys = sorted((w for w, c in counts.items() if c >= 2), key=lambda w: (-counts[w], w))
    return keys, [w for w, c in counts.items() if c == 1]


def ideal_summary(prompt: str) -> str:
    """The summary that scores 1.0: each key word once, most frequent first, then `.`."""
    return " ".join([*_topics(prompt)[0], SUMMARY_END])


def reward(prompt: str, response: str) -> float:
    """Gold reward of a summary, computed from the prompt alone.

    words = response.split(); ended = the last word is `.`; body = the words before the first `.`
    (all words if there is none). With keys k_1..k_n the prompt's key words, most frequent first:
      coverage = |keys in body| / n                       (1 if n = 0)
      order    = |{i : k_i, k_i+1 in body, k_i first seen before k_i+1}| / (n - 1)
                                                          (= coverage if n < 2)
      extras   = body words that are not keys + repeats of keys + words between the first `.`
                 and the final one (or the end)
      r = clip(0.6 coverage + 0.2 order + 0.2 ended - 0.1 extras, -1, 1)
    The ideal summary scores exactly 1.0.
    """
    keys = _topics(prompt)[0]
    words = response.split()
    ended = bool(words) and words[-1] == SUMMARY_END
    cut = words.index(SUMMARY_END) if SUMMARY_END in words else len(words)
    body, tail = words[:cut], words[cut + 1 : len(words) - ended]  # tail: after a mid-way `.`

    first: dict[str, int] = {}
    for i, w in enumerate(body):
        first.setdefault(w, i)
    present = sum(k in first for k in keys)
    coverage = present / len(keys) if keys else 1.0
    pairs = list(zip(keys, keys[1:]))
    in_order = sum(a in first and b in first and first[a] < first[b] for a, b in pairs)
    order = in_order / len(pairs) if pairs else coverage
    extras = len(body) - present + len(tail)  # all body words but each key's first occurrence
    r = 0.6 * coverage + 0.2 * order + 0.2 * ended - 0.1 * extras
    return max(-1.0, min(1.0, r))


def _prompt(rng: random.Random) -> str:
    """A shuffled post of 24-48 words followed by `tl;dr:`."""
    k, n_distractors = rng.randint(2, 4), rng.randint(1, 3)
    topics = rng.sample(TOPIC_WORDS, k + n_distractors)
    counts = rng.sample(KEY_COUNTS, k)
    words = [w for w, c in zip(topics, counts) for _ in range(c)] + topics[k:]
    words += rng.choices(FILLER_WORDS, k=rng.randint(*POST_LENGTH) - len(words))
    rng.shuffle(words)
    return " ".join([*words, PROMPT_END])


def _extra_word(rng: random.Random, distractors: list[str]) -> str:
    """A word a summary should not contain: a distractor or a filler word, evenly."""
    return rng.choice(distractors if rng.random() < 0.5 else FILLER_WORDS)


def _insert(rng: random.Random, body: list[str], word: str) -> None:
    """Insert `word` into `body` at a uniformly drawn position."""
    body.insert(rng.randrange(len(body) + 1), word)


def _reference(prompt: str) -> str:
    """A good but imperfect "human" summary: the ideal less its least frequent key, as a hurried
    writer leaves out a detail. It scores 0.5 (2 keys), 0.7 (3) or about 0.78 (4); any summary
    that names every key in order with at most one extra word beats it."""
    keys = _topics(prompt)[0]
    return " ".join([*keys[:-1], SUMMARY_END])


def demonstrate(rng: random.Random, prompt: str) -> str:
    """An SFT demonstration from a noisy summariser: usually partly right, rarely ideal. Two of
    them per prompt, ranked by `reward`, make offline preference pairs."""
    keys, distractors = _topics(prompt)
    kept = [w for w in keys if rng.random() < 0.6] or [rng.choice(keys)]
    body = list(kept)
    if rng.random() < 0.15:
        _insert(rng, body, _extra_word(rng, distractors))
    if rng.random() < 0.1:
        _insert(rng, body, rng.choice(kept))
    if rng.random() < 0.95:
        body.append(SUMMARY_END)
    return " ".join(body)


def make_task(seed: int = 0, n_sft: int = 4000, n_align: int = 2000, n_eval: int = 256) -> Task:
    """The digest task, deterministic in `seed`, with no prompt shared between its three sets."""
    return draw_task("digest", seed, (n_sft, n_align, n_eval), _prompt, demonstrate, _reference)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over digest's words (`bpo.tasks.wordlevel`)."""
    return wordlevel.build_tokenizer(WORDS)
