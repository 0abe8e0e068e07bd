"""Annotators: who says which of two responses is better.

Every annotator answers `compare(prompts, a, b)` with a signed preference per pair (> 0 prefers a,
< 0 prefers b, 0 is a tie) and counts its calls. Annotators that score one response at a time
(a Python function, a reward model) derive `compare` from `score`; a pairwise preference model
answers `compare` directly. Wrappers simulate noisy humans (Bradley-Terry labels) and penalise
length. `build_annotator` makes the one a run's `annotator` config asks for.
"""

from __future__ import annotations

import copy
import importlib
import math
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from bpo.checks import check_model_folder
from bpo.config import AnnotatorConfig, ConfigError
from bpo.policy import DTYPES, avoid_cudnn_attention
from bpo.sequences import left_pad


class Annotator(ABC):
    """Judges pairs of responses; `calls` counts the pairs it was asked about."""

    def __init__(self) -> None:
        self.calls = 0

    @abstractmethod
    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Signed preference of a over b for each pair."""

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Signed preference of a over b for each pair: > 0 prefers a, < 0 b, 0 a tie."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(a)} a's and {len(b)} b's")
        self.calls += len(prompts)
        return self._compare(prompts, a, b)


class RewardAnnotator(Annotator):
    """An annotator that scores each response; preference is the score difference."""

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """A scalar reward per (prompt, response)."""

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        scores = self.score(list(prompts) * 2, list(a) + list(b))
        n = len(prompts)
        return [sa - sb for sa, sb in zip(scores[:n], scores[n:])]


class FunctionAnnotator(RewardAnnotator):
    """A Python function `reward(prompt, response) -> float`, named as `module:function`."""

    def __init__(self, spec: str, field: str = "annotator.function") -> None:
        super().__init__()
        self.spec = spec
        self.fn = load_function(spec, field)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"annotator {self.spec}: returned non-finite rewards {bad[:3]}")
        return scores


def load_function(spec: str, field: str) -> Callable[[str, str], float]:
    """Import `module:function`, with an error that says what is wrong and how to fix it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} is not module:function; e.g. mypkg:reward")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({e}); check it is on "
            "PYTHONPATH or installed"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field}: {module_name} has no function {attr!r}")
    return fn


class RewardModelAnnotator(RewardAnnotator):
    """A sequence-classification reward model with one output: r(x, y) is its logit.

    Encodings: `pair` gives the tokenizer (x, y) as a text pair ([CLS] x [SEP] y [SEP] with token
    types for BERT-style tokenizers), the encoding of the BPO paper's simulator (arXiv 2406.12168),
    OpenAssistant/reward-model-deberta-v3-large-v2; `chat` renders a user turn x and an assistant
    turn y with the tokenizer's chat template, as Llama-style reward models expect (the rendered
    text carries its own special tokens, so none are added again). Inputs longer than
    `max_length` tokens are truncated as the tokenizer truncates, counted in `truncated`, and
    warned of once. Rows are right-padded with the tokenizer's pad token; a tokenizer without one
    pads with its EOS. Encoder models ignore padding through the attention mask; decoder models
    (transformers' *ForSequenceClassification heads on Llama and the like) read the last token
    that is not `config.pad_token_id`, which is set to the pad token when the checkpoint has none,
    so a text that itself ends in that token is read one token earlier.
    """

    def __init__(
        self,
        path: str,
        encoding: str = "pair",
        max_length: int = 640,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        field: str = "annotator",
    ) -> None:
        super().__init__()
        self.tokenizer, self.model = _load(
            AutoModelForSequenceClassification, path, dtype, device, field
        )
        if encoding not in ("pair", "chat"):
            raise ConfigError(f"{field}.encoding: {encoding!r} is not pair or chat")
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"{field}.path: {path} is a classifier with num_labels="
                f"{self.model.config.num_labels}; a reward model has one output (num_labels=1)"
            )
        if encoding == "chat" and not self.tokenizer.chat_template:
            raise ConfigError(
                f"{field}.encoding: chat, but the tokenizer of {path} has no chat template; "
                f"set {field}.encoding=pair or save the tokenizer with a chat_template"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.path, self.encoding, self.field = path, encoding, field
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device)
        self.truncated = 0
        """Inputs cut at `max_length` so far."""

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            features, cut = encode_reward_inputs(
                self.tokenizer, self.encoding, prompts[start:end], responses[start:end],
                self.max_length,
            )  # fmt: skip
            if cut:
                self.truncated = _count_truncated(self, cut, len(features["input_ids"]))
            batch = self.tokenizer.pad(features, padding_side="right", return_tensors="pt")
            with own_precision(self.device):
                logits = self.model(**batch.to(self.device)).logits  # (n, 1)
            scores += logits.squeeze(-1).float().tolist()
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"{self.field}: {self.path} gave non-finite rewards {bad[:3]}")
        return scores


def encode_reward_inputs(
    tokenizer: PreTrainedTokenizerBase,
    encoding: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> tuple[dict[str, list], int]:
    """Token ids (and token types, where the tokenizer gives them) of each (x, y) as a reward
    model reads it, unpadded, in `encoding` (see RewardModelAnnotator); and how many inputs were
    truncated at `max_length`. Shared by the annotator and reward-model training."""
    if encoding == "pair":
        texts, special = [list(prompts), list(responses)], True
    else:
        chats = [
            [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
            for x, y in zip(prompts, responses)
        ]
        texts = [[tokenizer.apply_chat_template(c, tokenize=False) for c in chats]]
        special = False  # the template wrote them
    features = tokenizer(*texts, add_special_tokens=special, verbose=False).data
    long = [i for i, ids in enumerate(features["input_ids"]) if len(ids) > max_length]
    if long:  # re-encode only these, so truncation is counted exactly
        cut = tokenizer(
            *([column[i] for i in long] for column in texts),
            add_special_tokens=special,
            truncation=True,
            max_length=max_length,
        )
        for key, values in features.items():
            for j, i in enumerate(long):
                values[i] = cut[key][j]
    return features, len(long)


PREFERENCE_TEMPLATE = "[CONTEXT] {prompt} [RESPONSE A] {a} [RESPONSE B] {b}"
"""What a preference model reads before its answer prefix."""


class PreferenceModelAnnotator(Annotator):
    """A causal LM asked which of two responses is better, the pairwise preference model of
    RLHF Workflow (arXiv 2405.07863).

    It reads PREFERENCE_TEMPLATE followed by `answer_prefix`; its preference for the response
    shown first is P(A)/(P(A)+P(B)) − 1/2 over its next token, where A and B are the single
    tokens of `labels`. `compare` asks both orders and returns (p_ab − p_ba)/2, which cancels
    position bias and makes compare(x, a, b) = −compare(x, b, a) exactly. A model trained for it
    learns to put `labels[0]` or `labels[1]` right after the prefix, as ids(prompt) + [label id].
    Inputs longer than `max_length` tokens keep their end (a leading BOS stays), are counted in
    `truncated` and warned of once.
    """

    def __init__(
        self,
        path: str,
        max_length: int = 640,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        field: str = "annotator",
        answer_prefix: str = " [BEST] ",
        labels: tuple[str, str] = ("A", "B"),
    ) -> None:
        super().__init__()
        self.tokenizer, self.model = _load(AutoModelForCausalLM, path, dtype, device, field)
        self.label_ids = label_token_ids(self.tokenizer, labels, path, f"{field}.path")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        self.answer_prefix, self.field = answer_prefix, field
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device)
        self.truncated = 0
        """Inputs cut at `max_length` so far."""

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        n = len(prompts)
        p = self.prefer_first(list(prompts) * 2, list(a) + list(b), list(b) + list(a))
        return [(p_ab - p_ba) / 2 for p_ab, p_ba in zip(p[:n], p[n:])]  # position bias cancels

    def prefer_first(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> list[float]:
        """P(A)/(P(A)+P(B)) − 1/2 with `first` shown as response A: one order, its bias kept."""
        rows, cut = preference_rows(
            self.tokenizer, prompts, first, second, self.answer_prefix, self.max_length
        )
        if cut:
            self.truncated = _count_truncated(self, cut, len(rows))
        return preference_for_first(
            self.model, rows, self.label_ids, self.pad_id, self.batch_size, self.device
        )


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, labels: Sequence[str], path: str, field: str
) -> list[int]:
    """The token id of each of the two labels; a label the tokenizer splits, or two labels on one
    token, is an error naming `field`."""
    label_ids = [tokenizer.encode(t, add_special_tokens=False) for t in labels]
    if any(len(ids) != 1 for ids in label_ids) or label_ids[0] == label_ids[1]:
        raise ConfigError(
            f"{field}: the tokenizer of {path} splits the labels {list(labels)} into "
            f"{label_ids}; each must be one token, and the two distinct"
        )
    return [ids[0] for ids in label_ids]


def preference_rows(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    answer_prefix: str,
    max_length: int,
) -> tuple[list[list[int]], int]:
    """Token ids of PREFERENCE_TEMPLATE + `answer_prefix` per pair, `first` shown as response A,
    and how many rows were cut: a row longer than `max_length` keeps its end (the responses and
    the prefix) and a leading BOS. Shared by the annotator and preference-model training."""
    texts = [
        PREFERENCE_TEMPLATE.format(prompt=x, a=y1, b=y2) + answer_prefix
        for x, y1, y2 in zip(prompts, first, second)
    ]
    rows = tokenizer(texts)["input_ids"]
    long = [i for i, ids in enumerate(rows) if len(ids) > max_length]
    for i in long:
        keep = int(rows[i][0] == tokenizer.bos_token_id)
        rows[i] = rows[i][:keep] + rows[i][len(rows[i]) - max_length + keep :]
    return rows, len(long)


def next_token_logits(
    model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Logits of the token after each row, from one left-padded forward: (n, V)."""
    input_ids, mask = left_pad(rows, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L): padding leaves no gap
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=1,
    ).logits[:, -1]  # (n, V): next token after each row's last (left-padded) token


@torch.no_grad()
def preference_for_first(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> list[float]:
    """P(A)/(P(A)+P(B)) − 1/2 over the next token of each row, A and B the two label tokens."""
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        with own_precision(device):
            logits = next_token_logits(model, rows[start : start + batch_size], pad_id, device)
        pair = logits[:, list(label_ids)].float()  # (n, 2): logits of A and B
        out += (torch.sigmoid(pair[:, 0] - pair[:, 1]) - 0.5).tolist()  # P(A)/(P(A)+P(B))
    return out


class BradleyTerryNoise(RewardAnnotator):
    """A simulated noisy human: labels a preferred with probability σ((r_a − r_b)/temperature),
    the Bradley-Terry model, from its own seeded RNG.

    `compare` returns +1 or −1, never 0 (equal rewards are a coin flip); as temperature → 0 it is
    the sign of r_a − r_b. `score` passes the inner rewards through, so evaluation still reads
    noise-free rewards.
    """

    def __init__(self, inner: RewardAnnotator, temperature: float, seed: int) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"BradleyTerryNoise: temperature must be > 0, got {temperature}")
        self.inner, self.temperature = inner, temperature
        self.rng = random.Random(seed)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.inner.score(prompts, responses)

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        labels = []
        for margin in super()._compare(prompts, a, b):  # r_a − r_b
            p_a = 0.5 * (1 + math.tanh(margin / (2 * self.temperature)))  # σ(margin/T), stable
            labels.append(1.0 if self.rng.random() < p_a else -1.0)
        return labels


class LengthPenalty(RewardAnnotator):
    """r(x, y) − coef·|y|, |y| in characters (RLHF Workflow, arXiv 2405.07863, Eq. 9): a longer
    response must win by more than coef per extra character."""

    def __init__(self, inner: RewardAnnotator, coef: float) -> None:
        super().__init__()
        self.inner, self.coef = inner, coef

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        rewards = self.inner.score(prompts, responses)
        return [r - self.coef * len(y) for r, y in zip(rewards, responses)]


def build_annotator(
    cfg: AnnotatorConfig,
    default_function: str | None,
    device: torch.device,
    seed: int,
    field: str = "annotator",
    run_dir: Path = Path("."),
) -> Annotator:
    """The annotator `cfg` describes: the base judge, its length penalty, then its noise
    (noise outermost, so it labels penalised rewards). `default_function` is the reward of
    type=function when `cfg.function` is None (the task's gold reward). People (type=human)
    label through the `human/` folder of `run_dir`."""
    dtype = DTYPES[cfg.dtype]
    if cfg.type == "human":
        from bpo.human import HumanAnnotator  # it builds on Annotator, defined here

        return HumanAnnotator(run_dir / "human", cfg.labels_per_pair, cfg.wait, seed, run_dir)
    if cfg.type == "preference_model":
        return PreferenceModelAnnotator(
            cfg.path,
            cfg.max_length,
            cfg.batch_size,
            device,
            dtype,
            field,
            answer_prefix=cfg.answer_prefix,
            labels=tuple(cfg.labels),
        )  # config forbids noise and length penalty here: they need rewards
    if cfg.type == "reward_model":
        annotator: RewardAnnotator = RewardModelAnnotator(
            cfg.path, cfg.encoding, cfg.max_length, cfg.batch_size, device, dtype, field
        )
    elif cfg.function or default_function:
        annotator = FunctionAnnotator(cfg.function or default_function, f"{field}.function")
    else:
        raise ConfigError(
            f"{field}.type: function, but the task has no gold reward (a dataset); set "
            f"{field}.type=reward_model and {field}.path (the paper's simulator is "
            f"OpenAssistant/reward-model-deberta-v3-large-v2), or {field}.function=module:function"
        )
    if cfg.length_penalty:
        annotator = LengthPenalty(annotator, cfg.length_penalty)
    if cfg.noise_temperature:
        annotator = BradleyTerryNoise(annotator, cfg.noise_temperature, seed)
    return annotator


def evaluation_scorer(annotator: Annotator) -> Annotator:
    """The run's annotator as evaluation's judge: without its Bradley-Terry noise (evaluation
    reads rewards, not noisy labels), sharing its model, with a call counter of its own so that
    evaluating spends no annotation budget."""
    base = annotator.inner if isinstance(annotator, BradleyTerryNoise) else annotator
    scorer = copy.copy(base)
    scorer.calls = 0
    return scorer


def own_precision(device: torch.device | str) -> torch.autocast:
    """Run a judge in its own `annotator.dtype`, outside the run's autocast: under
    `precision: bf16` its scores would be rounded to bf16 steps (0.016 at a reward of 4), which
    ties or swaps close pairs."""
    return torch.autocast(torch.device(device).type, enabled=False)


def _load(auto_class: type, path: str, dtype: torch.dtype, device: torch.device | str, field: str):
    """Tokenizer and model from `path`, in eval mode without gradients, on `device`."""
    check_model_folder(path, f"{field}.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = auto_class.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{field}.path: could not load {path!r} as {auto_class.__name__} ({e}); give a local "
            "folder written by save_pretrained or a Hub id"
        ) from None
    model.requires_grad_(False)
    if torch.device(device).type == "cuda":
        avoid_cudnn_attention()  # cuDNN builds a plan per new shape (bpo.policy)
    return tokenizer, model.eval().to(device)


def _count_truncated(
    annotator: RewardModelAnnotator | PreferenceModelAnnotator, cut: int, n: int
) -> int:
    """The annotator's `truncated` count after `cut` of `n` inputs were truncated; the first
    truncation warns, so it is never silent."""
    if not annotator.truncated:
        warnings.warn(
            f"{annotator.field}: {cut} of {n} inputs were longer than {annotator.field}.max_length"
            f"={annotator.max_length} tokens and were truncated (the running count is the "
            f"annotator's `truncated`); raise {annotator.field}.max_length to read them whole",
            stacklevel=2,
        )
    return annotator.truncated + cut
