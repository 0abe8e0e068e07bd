"""Quiz: a word-level helpfulness stand-in whose questions have one checkable answer.

A prompt states how many of something a person has, for two questions in three one change to
that count, then asks for it; every number is a word from `zero` to `twenty`:

    prompt   = fact [change] question
    fact     = NAME has NUM OBJ .              (NUM in zero..ten before `gets`, else ..twenty)
    change   = NAME gets NUM more OBJ .        (add; NUM in one..ten)
             | NAME gives away NUM OBJ .       (subtract; NUM in one..the count)
    question = how many OBJ does NAME have ?

for example `tom has five pear . tom gets two more pear . how many pear does tom have ?`, whose
answer is seven. A third of the questions are plain look-ups, a third add and a third subtract.
(A first design with 2-3 facts about different people, the question about one of them, was too
hard for the demo's tiny model: its SFT policy was mostly wrong even on look-ups.)

The ideal response is the answer and `.`: `seven .`. The gold reward checks the
first number of the response against the answer computed from the prompt, with credit for a
near miss, so preference learning has a gradient toward the right number, and charges every
other word, so it also has one toward a terse answer.

The reference ("human") answer is right but hedged: `it is seven .` scores 0.8. The demonstrator
that writes the SFT data is right 80 % of the time (off by one 15 %, by two 5 %) and chatty: it
answers tersely 60 % of the time on look-ups and 30 % on sums and differences, otherwise after a
preamble (`it is`, `the answer is`, `i think it is`). So the peak lies in a high-likelihood region
of π_sft (Tajwar et al. 2024, arXiv 2404.14367): the right number is π_sft's mode after any
preamble, and the terse form is its mode on look-ups; preference learning has to sharpen it, mostly
by dropping the preamble on arithmetic, where π_sft's greedy answer ties the reference.
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerFast

from bpo.tasks import Task, draw_task, wordlevel

NUMBER_WORDS = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split()
)
NAMES = tuple(
    "ann tom sam mia joe eve bob liz max kim ian amy ted sue ray zoe "
    "dan pam ben ada gus ivy lou nia".split()
)
OBJECTS = tuple("apple pear plum egg coin book cup pen hat key ball card shoe sock fig nut".split())
PROMPT_WORDS = tuple("has gets more gives away how many does have ?".split())
PREAMBLES = (("it", "is"), ("the", "answer", "is"), ("i", "think", "it", "is"))
PREAMBLE_WORDS = tuple("the answer i think it is".split())  # `it is` inside `i think it is`
END = "."
WORDS = NUMBER_WORDS + NAMES + OBJECTS + PROMPT_WORDS + PREAMBLE_WORDS + (END,)
VOCAB = wordlevel.SPECIAL_TOKENS + WORDS

_VALUE = {w: i for i, w in enumerate(NUMBER_WORDS)}
FACT_COUNT = {"has": (0, 20), "gets": (0, 10), "gives": (1, 20)}  # by kind, drawn uniformly
CHANGE_COUNT = (1, 10)
NEAR_MISS = {0: 1.0, 1: 0.5, 2: 0.25}  # |given - answer| -> correctness credit
ERROR_RATE = {1: 0.15, 2: 0.05}  # the demonstrator's |error| -> probability
TERSE_RATE = {"has": 0.6, "gets": 0.3, "gives": 0.3}  # by question kind (look-up, add, subtract)
PREAMBLE_WEIGHTS = (0.5, 0.3, 0.2)  # of PREAMBLES, when not terse


def answer(prompt: str) -> int:
    """The asked count: the question's (NAME, OBJ) fact, plus or minus its change if any."""
    words = prompt.split()
    obj, name = words[-5], words[-3]  # ... how many OBJ does NAME have ?
    count = 0
    for i, w in enumerate(words[:-7]):
        if w == "has" and words[i - 1] == name and words[i + 2] == obj:
            count = _VALUE[words[i + 1]]
        elif w == "gets" and words[i - 1] == name and words[i + 3] == obj:
            count += _VALUE[words[i + 1]]
        elif w == "gives" and words[i - 1] == name and words[i + 3] == obj:
            count -= _VALUE[words[i + 2]]
    return count


def ideal_response(prompt: str) -> str:
    """The response that scores 1.0: the answer, then `.`."""
    return f"{NUMBER_WORDS[answer(prompt)]} {END}"


def reward(prompt: str, response: str) -> float:
    """Gold reward of an answer, computed from the prompt alone.

    words = response.split(); ended = the last word is `.`; body = the words before the first `.`
    (all words if there is none); tail = the words between the first `.` and the final one (or
    the end). With a = answer(prompt) and g the value of the body's first number word:
      correct = 1 if g = a, 0.5 if |g - a| = 1, 0.25 if |g - a| = 2, else 0 (0 with no number)
      extras  = body words other than that first number word + tail words
      r = clip(0.7 correct + 0.3 ended - 0.1 extras, -1, 1)
    The ideal response scores exactly 1.0; the reference `it is <a> .` 0.8.
    """
    words = response.split()
    ended = bool(words) and words[-1] == END
    cut = words.index(END) if END in words else len(words)
    body, tail = words[:cut], words[cut + 1 : len(words) - ended]
    numbers = [_VALUE[w] for w in body if w in _VALUE]
    correct = NEAR_MISS.get(abs(numbers[0] - answer(prompt)), 0.0) if numbers else 0.0
    extras = len(body) - bool(numbers) + len(tail)
    r = 0.7 * correct + 0.3 * ended - 0.1 * extras
    return max(-1.0, min(1.0, r))


def _prompt(rng: random.Random) -> str:
    """A fact, a change to the count for two questions in three, and the question."""
    name, obj, kind = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(tuple(TERSE_RATE))
    count = rng.randint(*FACT_COUNT[kind])
    sentences = [f"{name} has {NUMBER_WORDS[count]} {obj} ."]
    if kind == "gets":
        sentences.append(f"{name} gets {NUMBER_WORDS[rng.randint(*CHANGE_COUNT)]} more {obj} .")
    elif kind == "gives":
        given = rng.randint(1, count)
        sentences.append(f"{name} gives away {NUMBER_WORDS[given]} {obj} .")
    sentences.append(f"how many {obj} does {name} have ?")
    return " ".join(sentences)


def _kind(prompt: str) -> str:
    """`has` (a look-up), `gets` (a sum) or `gives` (a difference)."""
    words = prompt.split()
    return next((k for k in ("gets", "gives") if k in words), "has")


def _reference(prompt: str) -> str:
    """A good but imperfect "human" answer: right, after the hedge `it is`; it scores 0.8, so
    only the right number with at most one extra word beats it."""
    return f"it is {NUMBER_WORDS[answer(prompt)]} {END}"


def demonstrate(rng: random.Random, prompt: str) -> str:
    """One answer from the noisy demonstrator that writes the SFT data (and, two per prompt
    ranked by `reward`, offline preference pairs): right 80 % of the time, terse 60 % of the
    time on look-ups and 30 % on arithmetic, otherwise after a preamble."""
    a = answer(prompt)
    u, error = rng.random(), 0
    for size, rate in ERROR_RATE.items():
        if u < rate:
            error = size * rng.choice((-1, 1))
            break
        u -= rate
    given = a + error if 0 <= a + error < len(NUMBER_WORDS) else a - error
    body = [NUMBER_WORDS[given]]
    if rng.random() >= TERSE_RATE[_kind(prompt)]:
        body = [*rng.choices(PREAMBLES, weights=PREAMBLE_WEIGHTS)[0], *body]
    return " ".join([*body, END])


def make_task(seed: int = 0, n_sft: int = 4000, n_align: int = 2000, n_eval: int = 256) -> Task:
    """The quiz task, deterministic in `seed`, with no prompt shared between its three sets."""
    return draw_task("quiz", seed, (n_sft, n_align, n_eval), _prompt, demonstrate, _reference)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over quiz's words (`bpo.tasks.wordlevel`)."""
    return wordlevel.build_tokenizer(WORDS)
