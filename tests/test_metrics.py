"""BLEU-4 / ROUGE / exact match against values worked out by hand (formulas in the comments)."""

import math

import pytest

from ptuning.metrics import _words, bleu4, compute_metrics, exact_match, is_label_set, normalize_label, rouge


def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_identical_strings_score_100():
    for text in ("the cat sat on the mat", "今天天气很好"):
        assert bleu4(text, text) == 100.0
        assert rouge(text, text) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
        assert exact_match(text, " " + text + "\n") == 100.0


def test_english_shorter_prediction():
    # tokens: hyp = the cat sat (3), ref = the cat sat on the mat (6)
    # BLEU: p1 = 3/3, p2 = 2/2, p3 = 1/1, p4 = 0/1 -> method3 gives 1/(2^1 * 1) = 1/2; BP = exp(1 - 6/3)
    expected_bleu = math.exp(1 - 6 / 3) * (1 * 1 * 1 * 0.5) ** 0.25
    assert bleu4("the cat sat", "the cat sat on the mat") == round(expected_bleu * 100, 4) == 30.9349
    # ROUGE-N counts distinct n-grams (rouge_chinese, exclusive=True): ref unigrams {the, cat, sat, on, mat} = 5,
    # hyp 3, overlap 3; bigrams: ref 5, hyp 2, overlap 2. ROUGE-L: LCS 3 over 6 reference / 3 hypothesis tokens.
    scores = rouge("the cat sat", "the cat sat on the mat")
    assert scores["rouge-1"] == round(f1(3 / 3, 3 / 5) * 100, 4) == 75.0
    assert scores["rouge-2"] == round(f1(2 / 2, 2 / 5) * 100, 4) == 57.1429
    assert scores["rouge-l"] == round(f1(3 / 3, 3 / 6) * 100, 4) == 66.6667


def test_english_punctuation_is_its_own_token_and_case_counts():
    assert _words("Hello, world!", "en") == ["Hello", ",", "world", "!"]
    # hyp: hello , world !  ref: Hello , world !  -> 3 of 4 unigrams, bigrams (, world) (world !) of 3
    scores = rouge("hello, world!", "Hello, world!")
    assert scores["rouge-1"] == round(f1(3 / 4, 3 / 4) * 100, 4) == 75.0
    assert scores["rouge-2"] == round(f1(2 / 3, 2 / 3) * 100, 4) == 66.6667


def test_chinese_longer_prediction_characters_for_bleu_jieba_words_for_rouge():
    # BLEU over characters: hyp 你好世界 (4), ref 你好 (2): p1 = 2/4, p2 = 1/3, p3 = 0/2 -> 1/(2*2),
    # p4 = 0/1 -> 1/(4*1); hyp longer than ref so BP = 1.
    expected = (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25
    assert bleu4("你好世界", "你好") == round(expected * 100, 4) == 31.9472
    # jieba: 你好 / 世界 against 你好: unigram P = 1/2, R = 1/1; no reference bigram; LCS 1.
    assert _words("你好世界", "zh") == ["你好", "世界"]
    assert rouge("你好世界", "你好") == {"rouge-1": 66.6667, "rouge-2": 0.0, "rouge-l": 66.6667}


def test_chinese_partial_overlap():
    # jieba: 这部 / 电影 / 很 / 好看 against 我 / 喜欢 / 这部 / 电影: 2 of 4 words each way; bigram (这部 电影)
    # is 1 of 3 each way; LCS = 2 of 4.
    assert _words("这部电影很好看", "zh") == ["这部", "电影", "很", "好看"]
    assert _words("我喜欢这部电影", "zh") == ["我", "喜欢", "这部", "电影"]
    assert rouge("这部电影很好看", "我喜欢这部电影") == {
        "rouge-1": round(f1(2 / 4, 2 / 4) * 100, 4), "rouge-2": round(f1(1 / 3, 1 / 3) * 100, 4),
        "rouge-l": round(f1(2 / 4, 2 / 4) * 100, 4)}
    # characters: hyp 这部电影很好看 (7), ref 我喜欢这部电影 (7): p1 = 4/7, p2 = 3/6, p3 = 2/5, p4 = 1/4
    expected = (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu4("这部电影很好看", "我喜欢这部电影") == round(expected * 100, 4)


def test_empty_prediction_scores_zero_and_two_empty_strings_score_100():
    for ref in ("the cat sat", "你好世界"):
        assert bleu4("", ref) == 0.0 and bleu4("  \n", ref) == 0.0
        assert rouge("", ref) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
        assert exact_match("", ref) == 0.0
    assert bleu4("", "") == 100.0
    assert rouge("", "") == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_short_identical_answer_has_chatglm_smoothed_bleu():
    # 2 characters: p1 = 2/2, p2 = 1/1, p3 and p4 have no n-grams -> 1/2 and 1/4 (as ChatGLM reports).
    assert bleu4("正面", "正面") == round((1 * 1 * 0.5 * 0.25) ** 0.25 * 100, 4) == 59.4604


def test_compute_metrics_means_per_pair_scores():
    preds = ["the cat sat", "", "今天天气很好"]
    refs = ["the cat sat on the mat", "你好世界", "今天天气很好"]
    result = compute_metrics(preds, refs)
    assert result == {
        "bleu-4": round((30.9349 + 0 + 100) / 3, 4),
        "rouge-1": round((75.0 + 0 + 100) / 3, 4),
        "rouge-2": round((57.1429 + 0 + 100) / 3, 4),
        "rouge-l": round((66.6667 + 0 + 100) / 3, 4),
        "exact_match": round(100 / 3, 4),
    }


def test_label_set_adds_normalised_accuracy():
    preds = ["Positive.", "negative", "neg", "positive"]
    refs = ["positive", "negative", "negative", "positive"]
    assert is_label_set(refs) and not is_label_set(["a long free text answer", "another one"])
    assert normalize_label(" Positive. ") == "positive" and normalize_label("「正面」。") == "正面"
    result = compute_metrics(preds, refs)
    assert result["exact_match"] == 50.0
    assert result["accuracy"] == 75.0
    assert "accuracy" not in compute_metrics(preds, refs, label_set=False)


def test_language_can_be_forced_and_lengths_must_match():
    # forced Chinese scoring of an English pair: characters for BLEU
    assert bleu4("abcd", "abce", language="zh") == round((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25 * 100, 4)
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
    with pytest.raises(ValueError):
        bleu4("a", "b", language="fr")
    assert compute_metrics([], []) == {}


# ---------------------------------------------------------------- evaluation of a prefix checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny chat model, a random prefix saved for it, and a test file with reference replies."""
    import json

    import torch

    from ptuning.export import save_prefix
    from ptuning.model import attach_prefix, load_base_model
    from tiny_models import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    model_dir = save_tiny_checkpoint(root / "model")
    base, _ = load_base_model(model_dir)
    model = attach_prefix(base, 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
    save_prefix(model, str(root / "prefix"))
    with open(root / "test.jsonl", "w") as f:
        for prompt, response in [("hi", "hello"), ("what is it", "a cat"), ("ok", "ok"), ("x y z", "a b c")]:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return root, model_dir


def evaluate_argv(root, model_dir, out, *extra):
    return ["evaluate", "--model_name_or_path", model_dir, "--ptuning_checkpoint", str(root / "prefix"),
            "--test_file", str(root / "test.jsonl"), "--output_dir", str(out), "--max_new_tokens", "6",
            "--predict_batch_size", "3", *extra]


def test_evaluate_twice_gives_identical_files_and_the_metrics_of_its_predictions(checkpoint, tmp_path):
    import json

    import main

    root, model_dir = checkpoint
    assert main.main(evaluate_argv(root, model_dir, tmp_path / "a")) == 0
    assert main.main(evaluate_argv(root, model_dir, tmp_path / "b")) == 0
    for name in ("generated_predictions.jsonl", "eval_results.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a" / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["hello", "a cat", "ok", "a b c"]
    assert any(r["prediction"] for r in records)
    results = json.loads((tmp_path / "a" / "eval_results.json").read_text())
    expected = compute_metrics([r["prediction"] for r in records], [r["label"] for r in records])
    assert results == {**expected, "num_samples": 4}


def test_predictions_are_batched_greedy_replies(checkpoint, tmp_path):
    import json

    import ptuning
    from ptuning.data import ColumnSpec, load_rows, validate_rows
    from ptuning.infer import generate_replies, prompt_conversations

    import main

    root, model_dir = checkpoint
    assert main.main(evaluate_argv(root, model_dir, tmp_path)) == 0
    model, tokenizer = ptuning.load(model_dir, str(root / "prefix"))
    prompts = prompt_conversations(validate_rows(load_rows(str(root / "test.jsonl")), ColumnSpec(), "test"))
    one_by_one = [generate_replies(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    records = [json.loads(line) for line in (tmp_path / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == one_by_one


def test_sampling_only_by_flag_and_reproducible_with_a_seed(checkpoint, tmp_path):
    import main

    root, model_dir = checkpoint
    greedy = tmp_path / "greedy"
    assert main.main(evaluate_argv(root, model_dir, greedy)) == 0
    runs = []
    for name in ("s1", "s2"):
        assert main.main(evaluate_argv(root, model_dir, tmp_path / name, "--do_sample", "--temperature", "5",
                                       "--seed", "7")) == 0
        runs.append((tmp_path / name / "generated_predictions.jsonl").read_text())
    assert runs[0] == runs[1]
    assert runs[0] != (greedy / "generated_predictions.jsonl").read_text()


def test_do_predict_writes_eval_results_and_keeps_trainer_entries(checkpoint, tmp_path):
    import json

    import main

    root, model_dir = checkpoint
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "epoch": 2.0, "bleu-4": -1}))
    argv = ["--model_name_or_path", model_dir, "--ptuning_checkpoint", str(root / "prefix"), "--do_predict",
            "--test_file", str(root / "test.jsonl"), "--output_dir", str(tmp_path), "--max_new_tokens", "6",
            "--report_to", "none"]
    assert main.main(argv) == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["eval_loss"] == 1.5 and results["epoch"] == 2.0 and results["num_samples"] == 4
    assert 0 <= results["bleu-4"] <= 100 and {"rouge-1", "rouge-2", "rouge-l", "exact_match"} <= set(results)


def test_evaluate_needs_a_checkpoint_and_a_test_file(checkpoint, tmp_path, capsys):
    import main

    root, model_dir = checkpoint
    assert main.main(["evaluate", "--model_name_or_path", model_dir, "--test_file", str(root / "test.jsonl")]) == 2
    assert "--ptuning_checkpoint is required" in capsys.readouterr().err
    assert main.main(["evaluate", "--model_name_or_path", model_dir, "--ptuning_checkpoint", str(root / "prefix")]) == 2
    assert "--test_file is required" in capsys.readouterr().err
