"""The digest task: gold reward worked by hand, data generation, and the word-level tokenizer."""

from __future__ import annotations

import random
import statistics

import pytest
from transformers import AutoTokenizer

from bpo.tasks.digest import VOCAB, build_tokenizer, ideal_summary, make_task, reward

# keys: rent (4) > landlord (3) > cat (2); distractor: dog (1)
PROMPT = "rent i landlord rent the cat my landlord rent dog a cat landlord rent so tl;dr:"


@pytest.fixture(scope="module")
def task():
    return make_task(0)


def test_ideal_summary_scores_one_and_beats_worse_summaries():
    assert ideal_summary(PROMPT) == "rent landlord cat ."
    assert reward(PROMPT, "rent landlord cat .") == 1.0
    assert reward(PROMPT, "rent landlord .") < 1.0
    assert reward(PROMPT, "i the my") < reward(PROMPT, "rent landlord .")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # coverage 3/3; pairs (rent, landlord) out of order, (landlord, cat) in order: order 1/2;
        # ended; no extras: 0.6 + 0.2 * 0.5 + 0.2 = 0.9
        ("landlord rent cat .", 0.9),
        # coverage 2/3; (rent, landlord) in order, cat missing: order 1/2; not ended; one extra
        # ("the"): 0.6 * 2/3 + 0.2 * 0.5 + 0 - 0.1 = 0.4
        ("rent the landlord", 0.4),
        # body "rent rent dog landlord cat", tail "cat" after the first `.`: coverage 1, order 1,
        # ended; extras: a repeated rent, dog, the tail cat = 3: 0.6 + 0.2 + 0.2 - 0.3 = 0.7
        ("rent rent dog landlord cat . cat .", 0.7),
        # just `.`: coverage 0, order 0, ended, no extras: 0.2
        (".", 0.2),
        # 15 fillers, not ended: -1.5, clipped to -1
        (" ".join(["the"] * 15), -1.0),
    ],
)
def test_reward_hand_worked(response, expected):
    assert reward(PROMPT, response) == pytest.approx(expected)


def test_reward_bounded_on_garbage():
    rng = random.Random(0)
    words = [*VOCAB, "xyz", "tl;dr"]
    for _ in range(500):
        response = " ".join(rng.choices(words, k=rng.randint(0, 60)))
        assert -1.0 <= reward(PROMPT, response) <= 1.0


def test_make_task_deterministic_and_disjoint(task):
    assert make_task(0, n_sft=50, n_align=20, n_eval=10) == make_task(
        0, n_sft=50, n_align=20, n_eval=10
    )
    assert make_task(1, n_sft=50).sft != make_task(0, n_sft=50).sft
    sft = {e.prompt for e in task.sft}
    align = set(task.align_prompts)
    evaluation = {e.prompt for e in task.eval}
    assert (len(sft), len(align), len(evaluation)) == (4000, 2000, 256)
    assert not (sft & align or sft & evaluation or align & evaluation)
    assert task.name == "digest" and task.reward == "bpo.tasks.digest:reward"


def test_posts_have_24_to_48_words(task):
    for prompt in task.align_prompts:
        *post, end = prompt.split()
        assert end == "tl;dr:" and 24 <= len(post) <= 48


def test_references_are_good_but_below_ideal(task):
    """The reference drops the least frequent key: 0.5 with 2 keys, 0.7 with 3, 0.78 with 4."""
    for e in task.eval:
        assert reward(e.prompt, ideal_summary(e.prompt)) == 1.0
        assert 0.5 <= reward(e.prompt, e.response) < 0.8


def test_demonstrations_are_noisy(task):
    ideal = sum(e.response == ideal_summary(e.prompt) for e in task.sft) / len(task.sft)
    assert ideal < 0.2
    demo = statistics.mean(reward(e.prompt, e.response) for e in task.sft)
    ref = statistics.mean(reward(e.prompt, e.response) for e in task.eval)
    assert demo < ref


def test_tokenizer_round_trip(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)

    prompt_ids = tok(PROMPT, add_special_tokens=True).input_ids
    assert prompt_ids[0] == tok.bos_token_id and tok.unk_token_id not in prompt_ids
    assert len(prompt_ids) == len(PROMPT.split()) + 1

    summary = "rent landlord cat ."
    ids = tok(summary, add_special_tokens=False).input_ids
    assert len(ids) == 4 and tok.bos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == summary
    padded = [tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(padded, skip_special_tokens=True) == summary
