"""Annotators: reward-model encodings, the order-symmetric preference model, Bradley-Terry noise,
the length penalty, the config that builds them, and runs that use them.

Every model here is tiny, built in process, saved with save_pretrained and loaded back through the
annotator's own from_pretrained path.
"""

import math
import random
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from bpo.annotators import (
    BradleyTerryNoise,
    FunctionAnnotator,
    LengthPenalty,
    PreferenceModelAnnotator,
    RewardAnnotator,
    RewardModelAnnotator,
    build_annotator,
    evaluation_scorer,
)
from bpo.config import AnnotatorConfig, ConfigError, TrainConfig, load_config
from bpo.evaluate import evaluate_run
from bpo.online import train
from bpo.pool import PreferencePool
from bpo.rundir import RunDir
from bpo.tasks.digest import build_tokenizer

WORDS = "the cat dog sat ran on a mat log big red A B [CONTEXT] [RESPONSE A] B] [BEST]".split()
"""The vocabulary: a few words, the labels A and B, and the preference template's words."""
CHAT_TEMPLATE = "<bos>{% for m in messages %} {{ m['role'] }}: {{ m['content'] }} <eos>{% endfor %}"


def word_tokenizer(bert: bool, chat_template: str | None = None, pad: bool = True):
    """Word-level tokenizer over WORDS: BERT-style ([CLS] x [SEP] y [SEP], token types) or
    Llama-style (<bos> first, `user:` / `assistant:` words for the chat template)."""
    if bert:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        post = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )  # fmt: skip
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        specials = ["<pad>", "<unk>", "<bos>", "<eos>", "user:", "assistant:"]
        post = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
        names = dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
        if pad:
            names["pad_token"] = "<pad>"
        input_names = ["input_ids", "attention_mask"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = post
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_input_names=input_names, **names
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_bert(path, num_labels: int = 1) -> str:
    tokenizer = word_tokenizer(bert=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
        num_labels=num_labels, initializer_range=0.5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return save(BertForSequenceClassification(config), tokenizer, path)


def llama_config(tokenizer, **kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.5, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )  # fmt: skip


def tiny_llama_rm(path, tokenizer) -> str:
    torch.manual_seed(0)
    return save(
        LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)), tokenizer, path
    )


@pytest.fixture(scope="module")
def preference_lm(tmp_path_factory) -> str:
    tokenizer = word_tokenizer(bert=False)
    torch.manual_seed(0)
    return save(LlamaForCausalLM(llama_config(tokenizer)), tokenizer, tmp_path_factory.mktemp("pm"))


@pytest.fixture(scope="module")
def preference_gpt2(tmp_path_factory) -> str:
    """GPT-2 has learned absolute positions, so left padding needs position ids from the mask
    (Llama's rotary positions are shift-invariant and would not notice)."""
    tokenizer = word_tokenizer(bert=False)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
        initializer_range=0.5, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("gpt2"))


PROMPTS = ["the cat sat on a mat", "a dog ran", "the big red log", "cat"]
RESPONSES = ["a cat sat", "the dog ran on the log", "red", "the big dog sat on a red mat"]


# --- reward models -----------------------------------------------------------------------------


def test_pair_encoding_is_a_text_pair_with_token_types(tmp_path):
    """r(x, y) = the model's logit on [CLS] x [SEP] y [SEP], token type 1 on y and its [SEP]."""
    path = tiny_bert(tmp_path)
    rm = RewardModelAnnotator(path, "pair", max_length=32, batch_size=3)  # 4 inputs: 2 batches
    model = BertForSequenceClassification.from_pretrained(path).eval()
    tok = rm.tokenizer
    expected, untyped = [], []
    for x, y in zip(PROMPTS, RESPONSES):
        q, a = ids(tok, x), ids(tok, y)
        input_ids = torch.tensor([[2, *q, 3, *a, 3]])
        types = torch.tensor([[0] * (len(q) + 2) + [1] * (len(a) + 1)])
        with torch.no_grad():
            expected.append(model(input_ids=input_ids, token_type_ids=types).logits.item())
            untyped.append(model(input_ids=input_ids).logits.item())
    scores = rm.score(PROMPTS, RESPONSES)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(abs(s - u) for s, u in zip(scores, untyped)) > 1e-3  # the token types matter
    assert rm.truncated == 0


def test_pair_truncation_is_counted_and_warned_once(tmp_path):
    """max_length 8 with a 1-word question and a 10-word answer: the tokenizer's longest-first
    truncation leaves [CLS] q [SEP] a1 a2 a3 a4 [SEP] (8 tokens); the short second input is
    untouched."""
    path = tiny_bert(tmp_path)
    rm = RewardModelAnnotator(path, "pair", max_length=8)
    model = BertForSequenceClassification.from_pretrained(path).eval()
    long_answer = "a big red dog sat on the mat the log"
    prompts, responses = ["cat", "a dog"], [long_answer, "ran"]
    with pytest.warns(UserWarning, match=r"1 of 2 inputs .*annotator\.max_length=8"):
        scores = rm.score(prompts, responses)
    assert rm.truncated == 1
    q, a = ids(rm.tokenizer, "cat"), ids(rm.tokenizer, long_answer)[:4]
    input_ids = torch.tensor([[2, *q, 3, *a, 3]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=input_ids, token_type_ids=types).logits.item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second truncation counts but does not warn again
        rm.score(prompts, responses)
    assert rm.truncated == 2


def test_chat_encoding_uses_the_template_once(tmp_path):
    """The chat template renders `<bos> user: x <eos> assistant: y <eos>`; no second <bos>."""
    tokenizer = word_tokenizer(bert=False, chat_template=CHAT_TEMPLATE)
    path = tiny_llama_rm(tmp_path, tokenizer)
    rm = RewardModelAnnotator(path, "chat", batch_size=4)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    bos, eos, user, assistant = tokenizer.convert_tokens_to_ids(
        ["<bos>", "<eos>", "user:", "assistant:"]
    )
    expected = []
    for x, y in zip(PROMPTS, RESPONSES):
        row = [bos, user, *ids(tokenizer, x), eos, assistant, *ids(tokenizer, y), eos]
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([row])).logits.item())
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_tokenizer_without_pad_scores_batches_as_single_rows(tmp_path):
    """EOS pads; the model's pad_token_id follows, so batching mixed lengths changes nothing."""
    tokenizer = word_tokenizer(bert=False, pad=False)
    path = tiny_llama_rm(tmp_path, tokenizer)
    batched = RewardModelAnnotator(path, "pair", batch_size=4).score(PROMPTS, RESPONSES)
    single = RewardModelAnnotator(path, "pair", batch_size=1).score(PROMPTS, RESPONSES)
    assert batched == pytest.approx(single, abs=1e-5)


def test_judges_keep_their_own_precision_inside_a_bf16_run(tmp_path, preference_lm):
    """A run's bf16 autocast must not round the judge's scores (close pairs would tie)."""
    rm = RewardModelAnnotator(tiny_bert(tmp_path / "bert"), "pair")
    pm = PreferenceModelAnnotator(preference_lm, batch_size=16)
    plain = rm.score(PROMPTS, RESPONSES), pm.compare(PROMPTS, RESPONSES, RESPONSES[::-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rm.score(PROMPTS, RESPONSES) == plain[0]
        assert pm.compare(PROMPTS, RESPONSES, RESPONSES[::-1]) == plain[1]
        rounded = rm.model(**rm.tokenizer(PROMPTS, RESPONSES, padding=True, return_tensors="pt"))
    assert rounded.logits.dtype == torch.bfloat16  # what the judge would give without the fix


def test_reward_model_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^annotator\.path: .* num_labels=2"):
        RewardModelAnnotator(tiny_bert(tmp_path / "two", num_labels=2))
    with pytest.raises(ConfigError, match=r"^annotator\.encoding: chat, .* no chat template"):
        RewardModelAnnotator(tiny_bert(tmp_path / "bert"), "chat")
    with pytest.raises(ConfigError, match=r"^annotator\.path: no folder at .*missing; give"):
        RewardModelAnnotator(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^annotator\.path: could not load .*empty"):
        RewardModelAnnotator(str(tmp_path / "empty"))


# --- pairwise preference model -----------------------------------------------------------------


def test_preference_model_is_antisymmetric_only_after_averaging(preference_lm):
    pm = PreferenceModelAnnotator(preference_lm, batch_size=16)
    a, b = RESPONSES, RESPONSES[1:] + RESPONSES[:1]
    ab, ba = pm.compare(PROMPTS, a, b), pm.compare(PROMPTS, b, a)
    assert [x + y for x, y in zip(ab, ba)] == pytest.approx([0.0] * 4, abs=1e-6)
    assert max(map(abs, ab)) > 1e-3  # not trivially zero
    single_ab, single_ba = pm.prefer_first(PROMPTS, a, b), pm.prefer_first(PROMPTS, b, a)
    assert max(abs(x + y) for x, y in zip(single_ab, single_ba)) > 1e-3  # position bias
    assert ab == pytest.approx([(x - y) / 2 for x, y in zip(single_ab, single_ba)], abs=1e-7)
    assert pm.calls == 8


@pytest.mark.parametrize("lm", ["preference_lm", "preference_gpt2"])
def test_preference_model_reads_the_next_token_of_each_row(lm, request):
    """P(A)/(P(A)+P(B)) − 1/2 from the softmax at the end of the unpadded prompt, and the same
    in a left-padded batch of mixed lengths."""
    path = request.getfixturevalue(lm)
    pm = PreferenceModelAnnotator(path, batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = pm.tokenizer
    a, b = RESPONSES, RESPONSES[::-1]
    expected = []
    for x, y1, y2 in zip(PROMPTS, a, b):
        text = f"[CONTEXT] {x} [RESPONSE A] {y1} [RESPONSE B] {y2} [BEST]"
        row = [tok.bos_token_id, *ids(tok, text)]
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([row])).logits[0, -1].softmax(-1)
        p_a, p_b = probs[tok.convert_tokens_to_ids("A")], probs[tok.convert_tokens_to_ids("B")]
        expected.append((p_a / (p_a + p_b)).item() - 0.5)
    assert pm.prefer_first(PROMPTS, a, b) == pytest.approx(expected, abs=1e-5)


def test_preference_model_truncation_keeps_bos_and_the_end(preference_lm):
    pm = PreferenceModelAnnotator(preference_lm, max_length=6)
    model = LlamaForCausalLM.from_pretrained(preference_lm).eval()
    tok = pm.tokenizer
    with pytest.warns(UserWarning, match=r"1 of 1 inputs .*annotator\.max_length=6"):
        (got,) = pm.prefer_first(["the cat"], ["a dog"], ["red"])
    full = [
        tok.bos_token_id,
        *ids(tok, "[CONTEXT] the cat [RESPONSE A] a dog [RESPONSE B] red [BEST]"),
    ]
    row = [full[0], *full[-5:]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row])).logits[0, -1]
    logit_a, logit_b = logits[tok.convert_tokens_to_ids(["A", "B"])]
    assert got == pytest.approx(torch.sigmoid(logit_a - logit_b).item() - 0.5, abs=1e-5)
    assert pm.truncated == 1


def test_preference_labels_must_be_single_distinct_tokens(tiny_model):
    """The digest tokenizer knows neither A nor B: both are <unk>."""
    with pytest.raises(ConfigError, match=r"^annotator\.path: .* must be one token"):
        PreferenceModelAnnotator(tiny_model)


# --- noise and length penalty ------------------------------------------------------------------


class LeadingNumber(RewardAnnotator):
    """r(x, y) = the number y starts with."""

    def score(self, prompts, responses):
        return [float(y.split()[0]) for y in responses]


def noisy_labels(temperature: float, r_a: list[float], r_b: list[float], seed: int = 0):
    noise = BradleyTerryNoise(LeadingNumber(), temperature, seed)
    return noise.compare([""] * len(r_a), [str(r) for r in r_a], [str(r) for r in r_b])


def test_noise_at_zero_temperature_is_the_argmax_label():
    rng = random.Random(1)
    r_a = [round(rng.random(), 3) for _ in range(300)]
    r_b = [round(rng.random(), 3) for _ in range(300)]
    keep = [i for i in range(300) if r_a[i] != r_b[i]]
    labels = noisy_labels(1e-6, [r_a[i] for i in keep], [r_b[i] for i in keep])
    assert labels == [math.copysign(1.0, r_a[i] - r_b[i]) for i in keep]


def test_noise_at_large_temperature_is_a_coin_flip():
    labels = noisy_labels(1e3, [1.0] * 400, [0.0] * 400)  # argmax would say +1 every time
    assert set(labels) == {1.0, -1.0}
    assert 0.35 <= labels.count(1.0) / 400 <= 0.65


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_noise_follows_bradley_terry(temperature):
    """r_a − r_b = 1: a is preferred with probability σ(1/T), 0.731 at T = 1, 0.881 at T = 0.5."""
    labels = noisy_labels(temperature, [1.0] * 4000, [0.0] * 4000)
    p = 1 / (1 + math.exp(-1 / temperature))
    assert labels.count(1.0) / 4000 == pytest.approx(p, abs=0.025)


def test_noise_breaks_ties_by_coin_and_passes_scores_through():
    labels = noisy_labels(0.1, [0.5] * 100, [0.5] * 100)
    assert set(labels) == {1.0, -1.0}  # never a 0 tie
    assert labels == noisy_labels(0.1, [0.5] * 100, [0.5] * 100)  # seeded
    noise = BradleyTerryNoise(LeadingNumber(), 0.1, seed=0)
    assert noise.score(["", ""], ["0.25 x", "-1"]) == [0.25, -1.0]


def test_length_penalty_flips_the_ranking_past_the_reward_gap():
    """a = "0.9 aaaaaaaaaa" (14 chars), b = "0.3 bb" (6): gap 0.6, Δ|y| = 8, so a loses once
    coef·8 > 0.6, i.e. coef > 0.075."""
    a, b = "0.9 aaaaaaaaaa", "0.3 bb"
    assert LengthPenalty(LeadingNumber(), 0.07).compare(["x"], [a], [b])[0] > 0
    assert LengthPenalty(LeadingNumber(), 0.08).compare(["x"], [a], [b])[0] < 0
    assert LengthPenalty(LeadingNumber(), 0.08).score(["x"], [a]) == [pytest.approx(0.9 - 1.12)]


def test_wrappers_count_pairs_once():
    inner = LeadingNumber()
    outer = BradleyTerryNoise(LengthPenalty(inner, 0.01), 1.0, seed=0)
    outer.compare(["x"] * 3, ["1", "2", "3"], ["3", "2", "1"])
    outer.compare(["x"] * 2, ["1", "2"], ["3", "2"])
    assert outer.calls == 5


# --- config and factory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["annotator.type=reward_model"], r"^annotator\.path: annotator\.type=reward_model needs"),
        (["annotator.path=x"], r"^annotator\.path: set to 'x' but annotator\.type=function"),
        (["annotator.type=reward_model", "annotator.path=x", "annotator.function=m:f"],
         r"^annotator\.function: set to 'm:f' but annotator\.type=reward_model"),
        (["annotator.noise_temperature=-1"], r"^annotator\.noise_temperature: must be >= 0"),
        (["annotator.length_penalty=-0.1"], r"^annotator\.length_penalty: must be >= 0"),
        (["annotator.type=preference_model", "annotator.path=x", "annotator.length_penalty=0.1"],
         r"^annotator\.length_penalty: .*annotator\.type=preference_model does not"),
        (["annotator.type=preference_model", "annotator.path=x", "annotator.noise_temperature=1"],
         r"^annotator\.noise_temperature: .*annotator\.type=preference_model does not"),
        (["annotator.encoding=chat"],
         r"^annotator\.encoding: .*annotator\.type=function does not read"),
        (["annotator.type=reward_model", "annotator.path=x", "annotator.max_length=0"],
         r"^annotator\.max_length: must be >= 1"),
    ],
)  # fmt: skip
def test_annotator_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=["model.path=m", "method=offline_dpo", *overrides])


def test_build_annotator_nests_penalty_inside_noise_and_evaluation_drops_the_noise():
    cfg = AnnotatorConfig(noise_temperature=0.5, length_penalty=0.01)
    annotator = build_annotator(cfg, "bpo.tasks.digest:reward", torch.device("cpu"), seed=0)
    assert isinstance(annotator, BradleyTerryNoise)
    assert isinstance(annotator.inner, LengthPenalty)
    assert isinstance(annotator.inner.inner, FunctionAnnotator)
    annotator.compare(["x"], ["a"], ["b"])
    scorer = evaluation_scorer(annotator)
    assert isinstance(scorer, LengthPenalty) and scorer.inner is annotator.inner.inner
    assert scorer.calls == 0 and annotator.calls == 1


# --- runs --------------------------------------------------------------------------------------


def test_noisy_run_labels_every_pair(train_config):
    cfg = train_config("noisy", "method=offline_dpo", "annotator.noise_temperature=0.5")
    summary = train(cfg, progress=False)
    assert summary["pairs_annotated"] == 16 and summary["dropped_ties"] == 0
    assert summary["annotator_calls"] >= 16
    assert {p.margin for p in PreferencePool.read(RunDir(cfg.output_dir).pool)} == {1.0}
    assert "gold_win_rate" not in summary  # judged by the gold reward already


def test_reward_model_run_labels_by_the_model(train_config, tmp_path):
    path = tiny_llama_rm(tmp_path / "rm", build_tokenizer())  # shares the policy's vocabulary
    cfg = train_config(
        "rm", "method=offline_dpo", "annotator.type=reward_model", f"annotator.path={path}"
    )
    summary = train(cfg, progress=False)
    assert summary["pairs_annotated"] == 16
    pairs = PreferencePool.read(RunDir(cfg.output_dir).pool)
    rm = RewardModelAnnotator(path)
    prompts = [p.prompt for p in pairs]
    margins = rm.compare(prompts, [p.chosen for p in pairs], [p.rejected for p in pairs])
    assert margins == pytest.approx([p.margin for p in pairs], abs=1e-5)
    assert min(margins) > 0
    again = evaluate_run(cfg.output_dir)  # the same judges as the run's evaluation
    assert again["eval/reward"] == pytest.approx(summary["reward"], abs=1e-5)
    assert again["eval/gold_win_rate"] == summary["gold_win_rate"]
    assert -1.0 <= summary["gold_reward"] <= 1.0 and summary["gold_reward"] != summary["reward"]
