"""People in the loop: the human/ queue, HumanAnnotator, import / export, agreement, and a run
that stops for labels and continues with --resume."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest

from bpo.checks import ConfigError
from bpo.cli import main
from bpo.config import AnnotatorConfig, TrainConfig, load_config
from bpo.evaluate import evaluation_judge
from bpo.human import (
    HumanAnnotator,
    Label,
    LabelQueue,
    WaitingForLabels,
    agreement,
    answer,
    counted_labels,
    export_pending,
    import_labels,
)
from tests.conftest import TINY_TASK

PROMPTS, A, B = ["p0", "p1", "p2", "p3"], ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]


def label(pair: str, choice: str, who: str) -> Label:
    return Label(pair, choice, who, "c" * 8, "2026-11-22T00:00:00+00:00")


def test_a_batch_is_written_once_with_ids_and_order_fixed_by_content_and_seed(tmp_path):
    queue = LabelQueue(tmp_path)
    pairs = queue.add_batch(PROMPTS, A, B, needed=1, seed=0)
    again = LabelQueue(tmp_path).add_batch(PROMPTS, A, B, needed=1, seed=0)
    assert pairs == again and queue.pending() == pairs  # written once, same ids and order
    assert len({p.id for p in pairs}) == 4
    for p, ya, yb in zip(pairs, A, B):
        assert (p.first, p.second) == ((yb, ya) if p.swapped else (ya, yb))
    orders = {
        tuple(p.swapped for p in queue.add_batch(PROMPTS, A, B, 1, seed)) for seed in range(8)
    }
    assert len(orders) > 1  # the shown order is random, by seed


def test_answers_turn_the_shown_order_back_and_take_the_majority(tmp_path):
    pairs = LabelQueue(tmp_path).add_batch(PROMPTS, A, B, needed=3, seed=0)
    plain = next(p for p in pairs if not p.swapped)
    swapped = next(p for p in pairs if p.swapped)
    assert answer(plain, [label(plain.id, "first", "x")]) == 1.0  # a is better
    assert answer(swapped, [label(swapped.id, "first", "x")]) == -1.0  # first shown is b
    votes = [label(plain.id, c, w) for c, w in (("first", "x"), ("second", "y"), ("second", "z"))]
    assert answer(plain, votes) == -1.0
    assert answer(plain, votes[:2]) == 0.0  # an even split is a tie
    assert answer(plain, [label(plain.id, "tie", "x")]) == 0.0


def test_counted_labels_skip_repeats_skips_and_extras(tmp_path):
    (p,) = LabelQueue(tmp_path).add_batch(["x"], ["a"], ["b"], needed=2, seed=0)
    given = [
        label(p.id, "skip", "ann"),  # passes the pair on: counts for nothing
        label(p.id, "first", "ann"),
        label(p.id, "second", "ann"),  # the same annotator again: ignored
        label(p.id, "second", "bob"),
        label(p.id, "first", "cat"),  # beyond labels_per_pair: ignored
    ]
    assert [v.annotator for v in counted_labels([p], given)[p.id]] == ["ann", "bob"]


def test_agreement_is_the_share_of_unanimous_pairs_and_fleiss_kappa(tmp_path):
    pairs = LabelQueue(tmp_path).add_batch(PROMPTS, A, B, needed=2, seed=0)
    choices = [("first", "first"), ("first", "first"), ("second", "second"), ("first", "second")]
    counted = {
        p.id: [label(p.id, c, w) for c, w in zip(pair_choices, "xy")]
        for p, pair_choices in zip(pairs, choices)
    }
    out = agreement(pairs, counted)
    # by hand: P_i = 1, 1, 1, 0 -> P̄ = 0.75; p(first) = 5/8, p(second) = 3/8 -> P_e = 34/64
    assert out["pairs_labelled_twice"] == 4 and out["agreement"] == 0.75
    assert out["kappa"] == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    assert agreement(pairs, {p.id: [] for p in pairs}) == {}


def test_without_wait_the_annotator_stops_until_the_pairs_are_labelled(tmp_path):
    human = HumanAnnotator(tmp_path / "human", 1, wait=False, seed=0, run_dir=tmp_path)
    with pytest.raises(WaitingForLabels, match=f"4 pairs wait.*bpo annotate {tmp_path}"):
        human.compare(PROMPTS, A, B)
    queue = human.queue
    for p, choice in zip(queue.pending(), ["first", "second", "tie", "first"]):
        queue.give(p.id, choice, "ann", "c" * 8)
    expected = [answer(p, [label(p.id, c, "ann")]) for p, c in
                zip(queue.pending(), ["first", "second", "tie", "first"])]  # fmt: skip
    assert human.compare(PROMPTS, A, B) == expected
    assert len(queue.pending()) == 4  # asked again, not written again


def test_a_waiting_annotator_goes_on_when_the_last_label_arrives(tmp_path):
    human = HumanAnnotator(tmp_path / "h", 2, wait=True, seed=0, run_dir=tmp_path,
                           poll_seconds=0.05)  # fmt: skip
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.extend(human.compare(["x"], ["a"], ["b"])))
    thread.start()
    while not human.queue.pending():
        time.sleep(0.02)
    (p,) = human.queue.pending()
    human.queue.give(p.id, "first", "ann", "c" * 8)
    time.sleep(0.3)
    assert thread.is_alive()  # one of two labels: still waiting
    human.queue.give(p.id, "first", "bob", "c" * 8)
    thread.join(timeout=5)
    assert result == [-1.0 if p.swapped else 1.0]


def test_export_lists_what_still_needs_labels_and_import_adds_them(tmp_path):
    queue = LabelQueue(tmp_path / "human")
    pairs = queue.add_batch(PROMPTS, A, B, needed=2, seed=0)
    queue.give(pairs[0].id, "first", "ann", "c" * 8)
    queue.give(pairs[0].id, "tie", "bob", "c" * 8)
    assert export_pending(queue, tmp_path / "todo.csv") == 3
    rows = list(csv.DictReader(open(tmp_path / "todo.csv", encoding="utf-8")))
    assert [r["pair_id"] for r in rows] == [p.id for p in pairs[1:]]
    assert (rows[0]["response_1"], rows[0]["labels_needed"]) == (pairs[1].first, "2")
    export_pending(queue, tmp_path / "todo.jsonl")
    assert [json.loads(line)["pair_id"] for line in open(tmp_path / "todo.jsonl")] == [
        p.id for p in pairs[1:]
    ]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"pair_id": p.id, "choice": c, "annotator": w}) + "\n"
            for p in pairs[1:]
            for c, w in (("1", "ann"), ("Second", "cat"))
        )
        + json.dumps({"pair_id": pairs[1].id, "choice": "2", "annotator": "ann"})  # a repeat
        + "\n",
        encoding="utf-8",
    )
    out = import_labels(queue, labels)
    assert (out["imported"], out["already_given"], out["waiting"]) == (6, 1, 0)
    assert out["agreement"] == 0.0 and out["pairs_labelled_twice"] == 4


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"pair_id": "nope", "choice": "1"}, r"row 2: pair_id 'nope' is not a pair of this run"),
        ({"pair_id": "ID", "choice": "3"}, r"row 2: choice '3' is not one of 1, 2, tie"),
    ],
)
def test_a_bad_import_row_is_named_and_nothing_is_written(tmp_path, row, message):
    queue = LabelQueue(tmp_path / "human")
    (p,) = queue.add_batch(["x"], ["a"], ["b"], needed=1, seed=0)
    path = tmp_path / "in.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["pair_id", "choice"])
        writer.writeheader()
        writer.writerow({"pair_id": p.id, "choice": "1"})
        writer.writerow({k: v.replace("ID", p.id) for k, v in row.items()})
    with pytest.raises(ConfigError, match=message.replace("row 2", "row 3")):
        import_labels(queue, path)
    assert queue.labels() == []


def test_imports_need_names_where_pairs_need_several_people(tmp_path):
    queue = LabelQueue(tmp_path / "human")
    (p,) = queue.add_batch(["x"], ["a"], ["b"], needed=2, seed=0)
    unnamed = tmp_path / "unnamed.csv"
    unnamed.write_text(f"\ufeffpair_id,choice\n{p.id},1\n", encoding="utf-8")  # Excel's BOM
    with pytest.raises(ConfigError, match="row 2: the pair needs 2 labels from different people"):
        import_labels(queue, unnamed)
    first = import_labels(queue, unnamed, annotator="ann")
    assert (first["imported"], first["waiting"]) == (1, 1)
    second = tmp_path / "b" / "unnamed.csv"  # another person's file of the same name
    second.parent.mkdir()
    second.write_text(f"pair_id,choice\n{p.id},2\n{p.id},2\n", encoding="utf-8")
    out = import_labels(queue, second, annotator="bob")
    assert (out["imported"], out["already_given"], out["waiting"]) == (1, 1, 0)
    late = import_labels(queue, second, annotator="cat")
    assert (late["imported"], late["pair_complete"]) == (0, 2)
    assert queue.status()["by_annotator"] == {"ann": 1, "bob": 1}


@pytest.mark.parametrize(
    ("line", "message"),
    [("{oops", "line 2: not a JSON object"), ('["a", 1]', "line 2: not a JSON object")],
)
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    queue = LabelQueue(tmp_path / "human")
    (p,) = queue.add_batch(["x"], ["a"], ["b"], needed=1, seed=0)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"pair_id": p.id, "choice": "1"}) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=message):
        import_labels(queue, path)


def test_kappa_is_none_when_chance_agreement_is_certain(tmp_path):
    pairs = LabelQueue(tmp_path).add_batch(["x", "y"], ["a", "c"], ["b", "d"], 3, seed=0)
    counted = {p.id: [label(p.id, "tie", w) for w in "xyz"] for p in pairs}
    assert agreement(pairs, counted) == {"pairs_labelled_twice": 2, "agreement": 1.0,
                                         "kappa": None}  # fmt: skip


def test_a_writer_killed_mid_record_does_not_corrupt_the_next_label(tmp_path):
    queue = LabelQueue(tmp_path)
    (p,) = queue.add_batch(["x"], ["a"], ["b"], needed=1, seed=0)
    queue.labels_path.write_text('{"pair": "half', encoding="utf-8")  # cut short by a kill
    with pytest.warns(UserWarning, match="half-written"):
        queue.give(p.id, "first", None, "c" * 8)
    assert [(x.pair, x.choice) for x in queue.labels()] == [(p.id, "first")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["labels_per_pair=2"], "annotator.labels_per_pair: set to 2 but annotator.type=function"),
        (["type=human", "path=/m"], "annotator.path: set to '/m' but annotator.type=human"),
        (["type=human", "noise_temperature=1"], "annotator.noise_temperature: set to 1.0"),
        (["type=human", "labels_per_pair=0"], "annotator.labels_per_pair: must be >= 1"),
    ],
)
def test_annotator_fields_people_do_not_read_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(AnnotatorConfig, overrides=overrides)


def test_people_compare_pairs_so_best_of_n_is_refused(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="best-vs-worst of 4 needs rewards.*type=human"):
        load_config(TrainConfig, overrides=[f"model.path={tiny_model}", "T=2", "B=2",
                                            "method=bpo", "F=1", "annotator.type=human",
                                            "pairs.samples_per_prompt=4"])  # fmt: skip


def test_people_do_not_judge_evaluations(train_config):
    cfg = train_config("run", "method=bpo", "F=2", "annotator.type=human")
    judge = evaluation_judge(cfg, "bpo.tasks.digest:reward", "cpu")
    assert judge.spec == "bpo.tasks.digest:reward"  # the task's gold reward
    with pytest.raises(ConfigError, match="eval.scorer: annotator.type=human.*no gold reward"):
        evaluation_judge(cfg, None, "cpu")


def _label_everything(run, choice_of) -> int:
    """Export the run's pending pairs, label them with `choice_of(row index)`, import; return
    how many."""
    todo, done = run / "todo.csv", run / "done.csv"
    assert main(["annotate", str(run), "--export", str(todo)]) == 0
    rows = list(csv.DictReader(open(todo, encoding="utf-8")))
    with open(done, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["pair_id", "choice"])
        writer.writerows([r["pair_id"], choice_of(i)] for i, r in enumerate(rows))
    assert main(["annotate", str(run), "--import", str(done), "--annotator", "ann"]) == 0
    return len(rows)


def test_a_run_stops_for_labels_and_resumes_until_its_budget_is_labelled(tiny_model, tmp_path,
                                                                          capsys):  # fmt: skip
    run = tmp_path / "run"
    args = ["train", f"model.path={tiny_model}", *TINY_TASK, "T=4", "B=4", "F=2", "method=bpo",
            "lr=1e-3", "sampling.max_new_tokens=6", "eval.every=0", "eval.n_prompts=8",
            "device=cpu", "annotator.type=human", "annotator.wait=false",
            f"output_dir={run}"]  # fmt: skip
    assert main(args) == 3
    assert "pairs wait for labels" in capsys.readouterr().err
    choices = ["1", "2", "tie"]  # every third a tie: dropped, so the phase asks for more
    for _ in range(12):
        _label_everything(run, lambda i: choices[i % 3])
        code = main([*args, "--resume"])
        if code == 0:
            break
        assert code == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs_annotated"] == 16 and summary["dropped_ties"] > 0
    shown = {p.id: p for p in LabelQueue(run / "human").pending()}
    given = {x.pair: x.choice for x in LabelQueue(run / "human").labels()}
    pool = [json.loads(line) for line in open(run / "pool.jsonl")]
    decided = [shown[i] for i, c in given.items() if c != "tie"]
    assert len(pool) == len(decided) == 16
    for pair in decided:  # y_w is the response the person chose
        chosen = pair.first if given[pair.id] == "first" else pair.second
        assert any(r["prompt"] == pair.prompt and r["chosen"] == chosen for r in pool)
    assert summary["human_labels"] == len(given) == summary["annotator_calls"]
    assert (run / "checkpoints" / "step-000002").is_dir()  # saved at the second phase's start


def test_a_resumed_run_asks_about_the_responses_it_sampled_before(train_config, monkeypatch):
    """Where sampling would not repeat (vLLM, GPU kernels), the questions and the labels given
    to them must still match: the resumed run takes its stored samples back."""
    from bpo.online import train
    from bpo.policy import Policy

    cfg = train_config("run", "method=bpo", "F=2", "annotator.type=human", "annotator.wait=false")
    with pytest.raises(WaitingForLabels):
        train(cfg, progress=False)
    queue = LabelQueue(cfg.output_dir + "/human")
    asked = queue.pending()
    for p in asked:
        queue.give(p.id, "first", "ann", "c" * 8)
    real_sample = Policy.sample

    def different(self, prompt_ids, sampling, seed, greedy=False):  # another machine's draws
        return real_sample(self, prompt_ids, sampling, seed + 1, greedy)

    monkeypatch.setattr(Policy, "sample", different)
    with pytest.raises(WaitingForLabels):  # phase 0 answered from the labels; phase 1 waits
        train(cfg, progress=False, resume=True)
    assert queue.pending()[: len(asked)] == asked
    assert len(queue.pending()) > len(asked)
    pool = [json.loads(line) for line in open(f"{cfg.output_dir}/pool.jsonl")]
    assert {r["prompt"] for r in pool} <= {p.prompt for p in asked} and len(pool) == 8


def test_the_processes_of_a_human_run_wait_days_for_the_labels(train_config):
    """The ranks other than the main one wait in a collective while people label: a human run
    asks for the labelling timeout and nothing else (no backend on a CPU run)."""
    from bpo.start import LABELLING_TIMEOUT, open_run

    _, people = open_run(train_config("people", "method=bpo", "F=2", "annotator.type=human"))
    assert people.init_handler.to_kwargs() == {"timeout": LABELLING_TIMEOUT}
    _, model = open_run(train_config("model", "method=bpo", "F=2"))
    assert model.init_handler is None
