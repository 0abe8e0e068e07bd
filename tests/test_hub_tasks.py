"""The paper's datasets as tasks (`bpo.tasks.hub`), on small invented fixtures in the layouts of
CarperAI/openai_summarize_tldr and Anthropic/hh-rlhf: formats, disjoint deterministic sets,
prompt truncation and the error messages."""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bpo.config import TaskConfig
from bpo.tasks import DATASETS, load_task, task_demonstrator, task_tokenizer, wordlevel
from bpo.tasks.hub import LAYOUTS

FIXTURES = Path(__file__).parent / "fixtures"
TLDR = FIXTURES / "tldr"  # train 12 rows (rows 1 and 2 share a prompt), valid 3, test 4
HH = FIXTURES / "hh-rlhf"  # helpful-base train 10 rows (row 6 has an empty reply), test 4
HH_SKIPPED = "task.dataset: skipped 1 of the 10 rows of split 'train' whose reply"


def read(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, gzip'd or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def tldr(**fields) -> TaskConfig:
    return TaskConfig(
        **{"name": "tldr", "dataset": str(TLDR), "n_sft": None, "n_align": 4, "n_eval": 4} | fields
    )


def hh(**fields) -> TaskConfig:
    return TaskConfig(
        **{"name": "hh_helpful", "dataset": str(HH), "n_sft": None, "n_align": 3, "n_eval": 3}
        | fields
    )


def load_hh(cfg: TaskConfig, tokenizer=None):
    """Load an hh task, expecting the warning about helpful-base's empty reply."""
    with pytest.warns(UserWarning, match=HH_SKIPPED):
        return load_task(cfg, tokenizer)


def words() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (all of them <unk>) plus <bos>: a prompt of w
    words is w + 1 tokens."""
    return wordlevel.build_tokenizer(())


def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) trained on the fixture prompts, prepending <bos>."""
    texts = [r["prompt"] for r in read(TLDR / "train.jsonl")]
    texts += [r["chosen"] for r in read(HH / "helpful-base" / "train.jsonl.gz")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True).input_ids)


def prompts(task) -> list[str]:
    return [e.prompt for e in task.sft] + task.align_prompts + [e.prompt for e in task.eval]


def assert_disjoint(task) -> None:
    sft, align, held = (
        {e.prompt for e in task.sft},
        set(task.align_prompts),
        {e.prompt for e in task.eval},
    )
    assert len(align) == len(task.align_prompts) and len(held) == len(task.eval)
    assert not (sft & align or sft & held or align & held)


# --- formats and sets ---------------------------------------------------------------------------


def test_registered():
    assert set(DATASETS) == set(LAYOUTS)


def test_tldr_formats_and_eval_in_order():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip, truncate or leave out
        task = load_task(tldr())
    assert task.name == "tldr" and task.reward is None and task.truncated == 0
    for p in prompts(task):
        assert p.startswith("SUBREDDIT: r/") and "\nTITLE: " in p and "\nPOST: " in p
        assert p.endswith("\nTL;DR:")
    test = read(TLDR / "test.jsonl")
    assert [e.prompt for e in task.eval] == [r["prompt"] for r in test]
    assert [e.response for e in task.eval] == [" " + r["label"].strip() for r in test]
    labels = {r["prompt"]: set() for r in read(TLDR / "train.jsonl")}
    for r in read(TLDR / "train.jsonl"):
        labels[r["prompt"]].add(" " + r["label"].strip())
    for e in task.sft:
        assert e.response.startswith(" ") and e.response in labels[e.prompt]


@pytest.mark.parametrize(
    ("name", "data_dir", "skipped"),
    [("hh_helpful", "helpful-base", HH_SKIPPED), ("hh_harmless", "harmless-base", "1 of the 6")],
)
def test_hh_formats(name, data_dir, skipped):
    with pytest.warns(UserWarning, match=skipped):  # each train split has one empty reply
        task = load_task(hh(name=name))
    assert task.reward is None
    for p in prompts(task):
        assert p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:")
    train = [r["chosen"] for r in read(HH / data_dir / "train.jsonl.gz")]
    for e in task.sft:
        assert e.prompt + e.response in train  # the prompt, then " " + the last reply
    test = read(HH / data_dir / "test.jsonl.gz")
    assert [e.prompt + e.response for e in task.eval] == [r["chosen"] for r in test[:3]]
    assert any(p.count("\n\nHuman:") > 1 for p in prompts(task))  # multi-turn prompts
    (empty,) = [c.rstrip() for c in train if c.rstrip().endswith("\n\nAssistant:")]
    assert empty not in prompts(task)


def test_sets_disjoint_sized_and_all_the_rest():
    train = read(TLDR / "train.jsonl")
    task = load_task(tldr(n_sft=None, n_align=4, n_eval=3))
    assert (len(task.align_prompts), len(task.eval)) == (4, 3)
    assert_disjoint(task)
    # n_sft=None: every train row whose prompt is not an alignment prompt (the eval split is
    # another split with other prompts)
    rest = [r for r in train if r["prompt"] not in task.align_prompts]
    assert sorted(e.response for e in task.sft) == sorted(" " + r["label"].strip() for r in rest)
    small = load_task(tldr(n_sft=2, n_align=4, n_eval=3))
    assert small.sft == task.sft[:2] and small.align_prompts == task.align_prompts


def test_sets_deterministic_in_the_seed():
    assert load_task(tldr(seed=3)) == load_task(tldr(seed=3))
    a, b = load_task(tldr(seed=0)), load_task(tldr(seed=1))
    assert a.align_prompts != b.align_prompts and a.eval == b.eval


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_align": 12}, "task.n_align=12: asks for more than the data hold: 11 distinct prompts"),
        ({"n_sft": 9}, r"task.n_sft=9: asks .* 8 rows .* or set it to null"),
        (
            {"n_eval": 5},
            "task.n_eval=5: asks for more than the data hold: 4 distinct prompts in split 'test'",
        ),
        ({"n_align": -1}, r"task.n_align: must be >= 0, got -1"),
    ],
)
def test_too_many_asked(fields, message):
    # 11 distinct train prompts; 3 alignment prompts leave 8 or 9 rows (the shared prompt)
    with pytest.raises(ValueError, match=message):
        load_task(tldr(**{"n_align": 3, **fields}))


# --- truncation ---------------------------------------------------------------------------------


def test_tldr_truncation_keeps_header_and_start_of_post():
    tok, limit = words(), 60
    with pytest.warns(UserWarning) as record:
        task = load_task(tldr(max_prompt_tokens=limit), tok)
    (message,) = [str(w.message) for w in record]
    counts = re.match(
        rf"task.max_prompt_tokens={limit}: truncated (\d) of the \d+ sft / (\d) of the 4 alignment "
        r"/ 0 of the 4 eval prompts \(keeping the start of the post",
        message,
    )
    assert counts and int(counts[1]) + int(counts[2]) == 1 == task.truncated
    (long,) = [r["prompt"] for r in read(TLDR / "train.jsonl") if "gardening" in r["prompt"]]
    (cut,) = [p for p in prompts(task) if "gardening" in p]
    head, post = long.split("POST: ")
    assert cut.startswith(head + "POST: Week 1:") and cut.endswith("\nTL;DR:")
    assert post.startswith(cut[len(head + "POST: ") : -len("\nTL;DR:")] + " ")  # whole words
    assert n_tokens(tok, cut) == limit  # the least cut: one word per token


def test_hh_truncation_keeps_the_last_turns():
    tok, limit = words(), 70
    with pytest.warns(UserWarning, match=rf"task.max_prompt_tokens={limit}: truncated") as record:
        task = load_hh(hh(max_prompt_tokens=limit), tok)
    assert task.truncated == 1 and any("truncated 1 of" in str(w.message) for w in record)
    chosen = [r["chosen"] for r in read(HH / "helpful-base" / "train.jsonl.gz")]
    long = chosen[2][: chosen[2].rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    (cut,) = [p for p in prompts(task) if "Step 5" in p]
    assert long.endswith(cut) and cut.startswith("\n\nHuman: Step 4 of my shelf")
    assert n_tokens(tok, cut) <= limit < n_tokens(tok, long[long.rindex("\n\nHuman: Step 3") :])


def test_hh_truncation_cuts_the_start_of_the_last_human_turn():
    tok, limit = words(), 8  # <bos> Human: <5 words> Assistant:
    with pytest.warns(
        UserWarning, match=r"truncated \d of the 6 sft / \d of the 3 alignment / 2 of the 3 eval"
    ):
        task = load_hh(hh(max_prompt_tokens=limit), tok)
    assert task.truncated == 10  # all but two short prompts
    (cut,) = [p for p in prompts(task) if "plaster" in p]
    assert cut == "\n\nHuman: 5 on a plaster wall?\n\nAssistant:"
    for p in prompts(task):
        assert n_tokens(tok, p) <= limit and p.startswith("\n\nHuman: ")
    assert_disjoint(task)


def one_more_word(original: str, cut: str) -> str:
    """`cut`, a tldr prompt with the end of its post cut, with the next word of `original`'s post
    back."""
    at = original.index("POST:") + len("POST:")
    kept = len(cut[at:].split()) - 1  # the post's words, then TL;DR:
    ends = [m.end() for m in re.finditer(r"\S+", original[at:])]
    return original[: at + ends[kept]] + "\nTL;DR:"


@pytest.mark.parametrize(
    ("tokenizer", "limit"),  # byte_bpe: up to 56 tokens for a tldr header
    [(words, 24), (words, 40), (byte_bpe, 64), (byte_bpe, 80)],
)
def test_truncated_prompts_fit_any_tokenizer(tokenizer, limit):
    tok = tokenizer()
    with pytest.warns(UserWarning, match=f"task.max_prompt_tokens={limit}"):
        tl = load_task(tldr(max_prompt_tokens=limit), tok)
        conv = load_hh(hh(max_prompt_tokens=limit), tok)
    assert tl.truncated > 0 and conv.truncated > 0
    raw = {r["prompt"].split("POST:")[0]: r["prompt"] for r in read(TLDR / "train.jsonl")}
    raw |= {r["prompt"].split("POST:")[0]: r["prompt"] for r in read(TLDR / "test.jsonl")}
    for p in prompts(tl):
        assert n_tokens(tok, p) <= limit and p.startswith("SUBREDDIT: r/") and p.endswith("TL;DR:")
        original = raw[p.split("POST:")[0]]
        if p != original:  # the least cut: one more word of the post is too long
            assert n_tokens(tok, one_more_word(original, p)) > limit
    for p in prompts(conv):
        assert n_tokens(tok, p) <= limit and p.endswith("\n\nAssistant:")
    assert_disjoint(tl)
    assert_disjoint(conv)


def test_long_prompts_error_and_limits_that_cannot_run():
    tok = words()
    (long,) = [r["prompt"] for r in read(TLDR / "train.jsonl") if "gardening" in r["prompt"]]
    n = len(long.split()) + 1
    with pytest.raises(
        ValueError,
        match=rf"task.max_prompt_tokens=60: split 'train' row 0 has a {n}-token prompt "
        r"\(task.long_prompts=error\); raise task.max_prompt_tokens or set "
        "task.long_prompts=truncate",
    ):
        load_task(tldr(max_prompt_tokens=60, long_prompts="error"), tok)
    with pytest.raises(ValueError, match=r"even cut as far as it goes .*raise task.max_prompt"):
        load_task(tldr(max_prompt_tokens=8), tok)  # the header alone is longer
    with pytest.raises(
        ValueError, match=r"task.max_prompt_tokens=60 counts .*load_task\(cfg, tokenizer\)"
    ):
        load_task(tldr(max_prompt_tokens=60))


# --- sources and error messages -----------------------------------------------------------------


def test_single_file_holds_out_its_first_rows():
    """A data file is the split "train"; eval_split=train takes the first 3 distinct prompts
    (rows 0, 1 and 3: row 2 repeats row 1's prompt, so it is left out of the other sets)."""
    train = read(TLDR / "train.jsonl")
    cfg = tldr(dataset=str(TLDR / "train.jsonl"), eval_split="train", n_eval=3, n_align=3)
    with pytest.warns(UserWarning, match="left out 1 rows whose prompt is an eval prompt"):
        task = load_task(cfg)
    assert [e.prompt for e in task.eval] == [train[i]["prompt"] for i in (0, 1, 3)]
    assert len(task.sft) == 12 - 3 - 1 - 3
    assert_disjoint(task)
    with pytest.raises(
        ValueError, match=r"task.eval_split='test': .* its splits: train; .*eval_split=train"
    ):
        load_task(tldr(dataset=str(TLDR / "train.jsonl")))


def test_single_gzip_file_and_its_data_dir():
    path = str(HH / "helpful-base" / "train.jsonl.gz")
    task = load_hh(hh(dataset=path, eval_split="train", n_eval=2, n_align=2))
    assert len(task.eval) == 2 and len(task.sft) == 9 - 2 - 2
    with pytest.raises(ValueError, match=r"task.data_dir='helpful-base': .* is a data file"):
        load_task(hh(dataset=path, data_dir="helpful-base"))


def test_missing_split_lists_the_splits():
    with pytest.raises(
        ValueError,
        match=r"task.eval_split='valid': .* no split 'valid'; its splits: train, validation, test; "
        "set task.eval_split to one of them",
    ):
        load_task(tldr(eval_split="valid"))  # datasets names valid.jsonl "validation"
    task = load_task(tldr(eval_split="validation", n_eval=3))
    assert [e.prompt for e in task.eval] == [r["prompt"] for r in read(TLDR / "valid.jsonl")]
    with pytest.raises(
        ValueError, match=r"task.train_split='training': .* its splits: train, test"
    ):
        load_task(hh(train_split="training"))


def test_missing_column_names_the_field():
    with pytest.raises(
        ValueError,
        match=r"task.label_column='summary': split 'train' has no column 'summary'; its columns: "
        "prompt, label; set task.label_column to the column holding the human summary",
    ):
        load_task(tldr(label_column="summary"))
    with pytest.raises(
        ValueError, match=r"task.chosen_column='better': .* its columns: chosen, rejected"
    ):
        load_task(hh(chosen_column="better"))


def test_missing_dataset(tmp_path):
    for missing in (str(tmp_path / "nowhere"), "data/tldr/train.jsonl"):
        with pytest.raises(ValueError, match=rf"task.dataset='{re.escape(missing)}': no such file"):
            load_task(tldr(dataset=missing))
    with pytest.raises(ValueError, match=r"task.dataset=.*: load_dataset failed: "):
        load_task(tldr(dataset=str(tmp_path)))  # a folder without data files
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"a data file must be .json, .jsonl or .csv"):
        load_task(tldr(dataset=str(tmp_path / "data.txt")))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tldr_prompt_trailing_whitespace_stripped(tmp_path):
    rows = read(TLDR / "test.jsonl")
    write_jsonl(tmp_path / "test.jsonl", [r | {"prompt": r["prompt"] + " \n"} for r in rows])
    write_jsonl(tmp_path / "train.jsonl", read(TLDR / "train.jsonl"))
    task = load_task(tldr(dataset=str(tmp_path)))
    assert [e.prompt for e in task.eval] == [r["prompt"] for r in rows]


def test_malformed_rows_name_split_row_and_column(tmp_path):
    good = read(TLDR / "test.jsonl")
    write_jsonl(tmp_path / "test.jsonl", good)
    bad = {"prompt": "SUBREDDIT: r/x\nTITLE: t\nPOST: p", "label": " s"}
    write_jsonl(tmp_path / "train.jsonl", [good[0], bad])
    with pytest.raises(
        ValueError,
        match=r"task.prompt_column='prompt': split 'train' row 1: the prompt does not end with "
        r"'TL;DR:'",
    ):
        load_task(tldr(dataset=str(tmp_path)))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "TITLE: t\nTL;DR:", "label": "s"}])
    with pytest.raises(ValueError, match=r"row 0: the prompt has no 'POST:' field"):
        load_task(tldr(dataset=str(tmp_path)))
    write_jsonl(tmp_path / "train.jsonl", [good[0], {"prompt": " \n", "label": "s"}])
    with pytest.raises(
        ValueError, match=r"task.prompt_column='prompt': split 'train' row 1: the prompt is empty"
    ):
        load_task(tldr(dataset=str(tmp_path)))
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"chosen": "\n\nHuman: hi", "rejected": ""}])
    with pytest.raises(
        ValueError, match=r"task.chosen_column='chosen': split 'train' row 0: the transcript has no"
    ):
        load_task(hh(dataset=str(tmp_path), data_dir="."))
    write_jsonl(tmp_path / "train.jsonl", [{"chosen": "", "rejected": ""}])
    with pytest.raises(ValueError, match=r"split 'train' row 0: the prompt is empty"):
        load_task(hh(dataset=str(tmp_path), data_dir="."))


def test_built_in_tasks_unchanged():
    cfg = TaskConfig(name="digest", seed=2, n_sft=3, n_align=2, n_eval=1)
    task = load_task(cfg, tokenizer=None)
    assert task.reward == "bpo.tasks.digest:reward" and task.truncated == 0
    with pytest.raises(ValueError, match="task.n_sft: None .* is for datasets"):
        load_task(TaskConfig(name="digest", n_sft=None))
    for helper in (task_tokenizer, task_demonstrator):
        with pytest.raises(ValueError, match="task.name: tldr is a dataset; it has no built-in"):
            helper("tldr")


def test_built_in_tasks_reject_dataset_fields():
    with pytest.raises(
        ValueError, match="task.dataset: set to 'x.jsonl' but the built-in task quiz"
    ):
        TaskConfig(name="quiz", dataset="x.jsonl")
