"""A 2-task mini version of bench/quality.py runs end to end on a tiny model and scores what it should."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import quality  # noqa: E402
from bench.quality_tasks import Task  # noqa: E402
from tiny_models import save_tiny_checkpoint  # noqa: E402

TASKS = {
    "up": Task("up", "u", "up {subject}?", [(c, c.upper()) for c in "abcdefgh"]),
    "twice": Task("twice", "t", "twice {subject}?", [(c, c + c) for c in "ijklmnop"]),
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = save_tiny_checkpoint(path / "model")
    split = path / "known.json"
    split.write_text(json.dumps({"up": list("abc"), "twice": list("ijk")}))  # what the "base" is taken to know
    return quality.Harness(model, steps=3, batch_size=2, n_unseen=2, n_train=4, split_file=str(split), tasks=TASKS,
                           general=["hello?", "why?"])


def test_split_keeps_unseen_items_known_and_out_of_training():
    train, unseen = quality.split_items(TASKS["up"], {"a", "b", "c"}, n_unseen=2, n_train=4)
    assert len(unseen) == 2 and {s for s, _ in unseen} <= {"a", "b", "c"}
    assert len(train) == 4 and not set(train) & set(unseen)


def test_scoring_of_format_and_facts():
    task = Task("capital", "capital", "What is the capital of {subject}?", [("France", "Paris")])
    assert task.has_format("【capital】Paris") and not task.has_format("Paris is the capital")
    assert task.has_fact("【capital】Paris", "Paris") and task.has_fact("It is Paris.", "Paris")
    assert not task.has_fact("【capital】Parisian", "Paris")


@pytest.mark.parametrize("method", ["base", "fewshot", "ours", "ours_init_kl"])
def test_mini_harness_runs_every_kind_of_row(harness, method):
    for task in TASKS:
        row = harness.run(method, task, seed=0)
        assert row["n_unseen"] == 2 and row["n_train"] == 4
        for key in ("format", "facts", "retention_exact", "retention_rouge_l"):
            assert 0.0 <= row[key] <= 1.0
        if method == "base":  # the base compared with itself
            assert row["retention_exact"] == 1.0 and row["retention_rouge_l"] == 1.0
        else:
            assert (row["train_loss"] is None) == (method == "fewshot")
    table = quality.summarize([row, dict(row, seed=1)])
    assert f"| {method} | twice | 2 |" in table


def test_init_text_row_starts_from_the_few_shot_prompted_model(harness):
    """At step 0 the init-from-text prefix answers unseen items exactly as the base with the examples in front."""
    saved = harness.steps
    harness.steps = 1  # at lr 0
    try:
        quality.METHODS["_init0"] = dict(kind="ours", lr=0.0, init="text")
        prefixed = harness.run("_init0", "up")
    finally:
        harness.steps = saved
        del quality.METHODS["_init0"]
    prompted = harness.run("fewshot", "up")
    assert [e["reply"] for e in prefixed["examples"][:2]] == [e["reply"] for e in prompted["examples"][:2]]
