"""Learning quality: does a trained prefix learn a reply format without erasing what the base model knew?

For each task of ``bench/quality_tasks.py`` (a fixed format ``【tag】fact`` around facts the base knows), every
method trains on the same 40 rows with the same budget (steps x batch) and is scored on:

- format: share of replies to *unseen* items that start with the task's ``【tag】``;
- facts kept: share of unseen items whose reply contains the right fact. Unseen items are only ones the base model
  answers right when asked plainly (probed greedily first), so this is the share of the base's knowledge kept;
- out-of-task retention: greedy replies to 10 unrelated prompts, compared with the base model's own replies
  (exact match rate and mean ROUGE-L F, 0..1).

Run (one JSON line per method x task x seed is appended to --out; --table prints the markdown summary)::

    OMP_NUM_THREADS=1 python bench/quality.py --methods base,fewshot,ours --seeds 0 --out bench/results/quality_runs.jsonl
    python bench/quality.py --table bench/results/quality_runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments, set_seed  # noqa: E402

from bench.quality_tasks import GENERAL_EVAL, TASKS, Task, messages  # noqa: E402
from ptuning.args import PtuningTrainingArguments  # noqa: E402
from ptuning.data import Collator, encode_dataset  # noqa: E402
from ptuning.infer import generate_replies  # noqa: E402
from ptuning.metrics import rouge  # noqa: E402
from ptuning.model import attach_prefix, load_base_model  # noqa: E402
from ptuning.train import PrefixTrainer, apply_quality_levers  # noqa: E402

MODEL = ".cache/smollm2-135m-instruct"
FACT_TOKENS = 16      # new tokens per task answer
GENERAL_TOKENS = 40   # new tokens per out-of-task answer
SHOTS = 3

# name -> how it is trained. kind: base (no training) | fewshot (examples in the context) | ours | peft_prefix |
# peft_lora. Ours: lr, pre_seq_len, init ("text": the few-shot examples' keys/values), kl (weight), warmup ratio.
METHODS = {
    "base": dict(kind="base"),
    "fewshot": dict(kind="fewshot"),
    "ours": dict(kind="ours", lr=3e-2, pre_seq_len=16),            # scripts/train.sh defaults
    "ours_lr5e-5": dict(kind="ours", lr=5e-5, pre_seq_len=16),     # main.py without --learning_rate
    "ours_lr1e-2": dict(kind="ours", lr=1e-2, pre_seq_len=16),
    "ours_kl": dict(kind="ours", lr=3e-2, pre_seq_len=16, kl=1.0),
    "ours_init": dict(kind="ours", lr=3e-3, init="text"),
    "ours_init_lr1e-3": dict(kind="ours", lr=1e-3, init="text"),
    "ours_init_lr1e-2": dict(kind="ours", lr=1e-2, init="text"),
    "ours_init_kl": dict(kind="ours", lr=3e-3, init="text", kl=1.0),
    "ours_init_kl4": dict(kind="ours", lr=3e-3, init="text", kl=4.0),
    "ours_init16": dict(kind="ours", lr=3e-3, init="text", pre_seq_len=16),
    "peft_prefix": dict(kind="peft_prefix", lr=2e-2, pre_seq_len=16),
    "peft_lora": dict(kind="peft_lora", lr=2e-3, r=8),
}


def split_items(task: Task, known: set[str], n_unseen: int = 15, n_train: int = 40):
    """(train, unseen) item lists: unseen from the subjects the base knows, train from the rest; fixed order."""
    rng = random.Random(0)
    knew = [item for item in task.items if item[0] in known]
    rng.shuffle(knew)
    unseen = knew[:n_unseen]
    rest = [item for item in task.items if item not in unseen]
    rng.shuffle(rest)
    return rest[:n_train], unseen


def fewshot_turns(task: Task, train) -> list[dict]:
    """The first ``SHOTS`` training rows as earlier chat turns."""
    turns = []
    for subject, fact in train[:SHOTS]:
        turns += messages(task.prompt(subject), task.reply(subject, fact))
    return turns


def init_text(tokenizer, task: Task, train) -> str:
    """What ``init="text"`` starts the prefix from: the few-shot turns, rendered by the chat template."""
    turns = [{"role": t["role"], "content": t["content"]} for t in fewshot_turns(task, train)]
    return tokenizer.apply_chat_template(turns, tokenize=False)


class PeftGenerator:
    """The three things ``generate_replies`` uses, for a PEFT model whose ``generate`` takes keywords only."""

    def __init__(self, model):
        self.model = model

    @property
    def training(self):
        return self.model.training

    @property
    def device(self):
        return next(self.model.parameters()).device

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)

    def generate(self, input_ids, attention_mask, **kwargs):
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class Harness:
    def __init__(self, model_path: str = MODEL, steps: int = 60, batch_size: int = 8, n_unseen: int = 15,
                 n_train: int = 40, split_file: str | None = None, tasks: dict | None = None,
                 general: list[str] | None = None):
        self.model_path, self.steps, self.batch_size = model_path, steps, batch_size
        self.n_unseen, self.n_train = n_unseen, n_train
        self.tasks = tasks or TASKS
        self.general = general or GENERAL_EVAL
        self.split_file = split_file
        self.base, self.tokenizer = load_base_model(model_path, "fp32")
        self.known = self._known_subjects()
        self._base_general: dict[str, list[str]] = {}

    # ---- the base model's knowledge and out-of-task replies, computed once

    def _known_subjects(self) -> dict[str, list[str]]:
        if self.split_file and os.path.isfile(self.split_file):
            with open(self.split_file, encoding="utf-8") as f:
                return json.load(f)
        probe = attach_prefix(self.base, 1).eval()
        known = {}
        for name, task in self.tasks.items():
            with probe.prefix_disabled():
                replies = generate_replies(probe, self.tokenizer, [messages(task.prompt(s)) for s, _ in task.items],
                                           max_new_tokens=24, batch_size=16)
            known[name] = [s for (s, f), r in zip(task.items, replies) if task.has_fact(r, f)]
        if self.split_file:
            with open(self.split_file, "w", encoding="utf-8") as f:
                json.dump(known, f, indent=1, ensure_ascii=False)
        return known

    def base_general(self, preamble: tuple = ()) -> list[str]:
        key = json.dumps(preamble)
        if key not in self._base_general:
            probe = attach_prefix(self.base, 1).eval()
            with probe.prefix_disabled():
                self._base_general[key] = self._replies(probe, [list(preamble) + messages(p) for p in self.general],
                                                        GENERAL_TOKENS)
        return self._base_general[key]

    def _replies(self, model, conversations, max_new_tokens):
        return generate_replies(model, self.tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=16)

    # ---- one method on one task

    def run(self, method: str, task_name: str, seed: int = 0) -> dict:
        spec = METHODS[method]
        task = self.tasks[task_name]
        train, unseen = split_items(task, set(self.known[task_name]), self.n_unseen, self.n_train)
        start = time.time()
        set_seed(seed)
        preamble, train_loss = [], None
        kind = spec["kind"]
        if kind in ("base", "fewshot"):
            model = attach_prefix(self.base, 1).eval()
            generate_from = model.prefix_disabled()
            preamble = fewshot_turns(task, train) if kind == "fewshot" else []
        else:
            rows = [messages(task.prompt(s), task.reply(s, f)) for s, f in train]
            data = encode_dataset(rows, task_name, self.tokenizer, 128, 32)
            model, train_loss = self._train(spec, task, train, data, seed)
            generate_from = _nullcontext()
        with generate_from:
            answers = self._replies(model, [preamble + messages(task.prompt(s)) for s, _ in unseen], FACT_TOKENS)
            general = self._replies(model, [preamble + messages(p) for p in self.general], GENERAL_TOKENS)
        reference = self.base_general()
        return dict(
            method=method, task=task_name, seed=seed, steps=0 if kind in ("base", "fewshot") else self.steps,
            n_unseen=len(unseen), n_train=len(train),
            format=_mean(task.has_format(a) for a in answers),
            facts=_mean(task.has_fact(a, f) for a, (_, f) in zip(answers, unseen)),
            retention_exact=_mean(g == r for g, r in zip(general, reference)),
            retention_rouge_l=_mean(rouge(g, r, "en")["rouge-l"] / 100 for g, r in zip(general, reference)),
            train_loss=train_loss, seconds=round(time.time() - start, 1),
            examples=[dict(prompt=task.prompt(s), reply=a) for (s, _), a in list(zip(unseen, answers))[:3]]
            + [dict(prompt=self.general[0], reply=general[0])],
        )

    def _train(self, spec, task, train, data, seed):
        common = dict(output_dir=tempfile.mkdtemp(prefix="quality-"), max_steps=self.steps,
                      per_device_train_batch_size=self.batch_size, learning_rate=spec["lr"], seed=seed,
                      warmup_steps=int(spec.get("warmup", 0.0) * self.steps), save_strategy="no", report_to="none", use_cpu=True,
                      logging_steps=self.steps, disable_tqdm=True)
        collator = Collator(pad_token_id=self.tokenizer.pad_token_id)
        if spec["kind"] == "ours":
            text = init_text(self.tokenizer, task, train) if spec.get("init") == "text" else None
            pre_seq_len = spec.get("pre_seq_len") or len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            model = attach_prefix(self.base, pre_seq_len)
            args = PtuningTrainingArguments(**common, prefix_init_text=text, kl_weight=spec.get("kl", 0.0))
            trainer = PrefixTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
            apply_quality_levers(trainer, self.tokenizer, args)
            result = trainer.train()
            return model.eval(), result.training_loss
        import peft

        base, _ = load_base_model(self.model_path, "fp32")  # PEFT edits its base in place
        if spec["kind"] == "peft_prefix":
            config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec["pre_seq_len"])
        else:
            config = peft.LoraConfig(task_type="CAUSAL_LM", r=spec["r"], lora_alpha=2 * spec["r"],
                                     target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(base, config)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data.remove_columns("length"),
                          data_collator=collator)
        result = trainer.train()
        model.eval()
        return PeftGenerator(model), result.training_loss


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0


# ---- the summary table

TARGETS = dict(format=0.9, facts_kept=0.8, retention=0.8)


def summarize(rows: list[dict]) -> str:
    """Per method: mean (min–max over seeds) of each metric per task, and how many tasks meet all three targets."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], {}).setdefault(r["task"], []).append(r)
    tasks = sorted({r["task"] for r in rows})
    # facts kept = facts right / facts the base gets right plainly at the same reply length (1.0 by construction of
    # the unseen items when the probe's longer replies and these agree)
    base_facts = {t: statistics.mean(r["facts"] for r in by.get("base", {}).get(t, [])) or 1.0
                  for t in tasks if by.get("base", {}).get(t)}
    rows = [dict(r, facts=min(1.0, r["facts"] / base_facts.get(r["task"], 1.0))) for r in rows]
    by = {}
    for r in rows:
        by.setdefault(r["method"], {}).setdefault(r["task"], []).append(r)
    lines = ["| method | task | seeds | format | facts kept | retention ROUGE-L | retention exact | train loss | "
             "targets met |", "|---|---|---|---|---|---|---|---|---|"]
    overall = []
    for method in [m for m in METHODS if m in by]:
        met_tasks = 0
        agg = {"format": [], "facts": [], "retention_rouge_l": []}
        for task in tasks:
            runs = by[method].get(task)
            if not runs:
                continue
            cell = {}
            for key in ("format", "facts", "retention_rouge_l", "retention_exact"):
                values = [r[key] for r in runs]
                cell[key] = statistics.mean(values)
                spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
                cell[key + "_s"] = f"{cell[key]:.2f}{spread}"
            for key in agg:
                agg[key].append(cell[key])
            losses = [r["train_loss"] for r in runs if r["train_loss"] is not None]
            loss = f"{statistics.mean(losses):.3f}" if losses else "–"
            met = [cell["format"] >= TARGETS["format"], cell["facts"] >= TARGETS["facts_kept"],
                   cell["retention_rouge_l"] >= TARGETS["retention"]]
            met_tasks += all(met)
            flags = "".join("✓" if m else "✗" for m in met)
            lines.append(f"| {method} | {task} | {len(runs)} | {cell['format_s']} | {cell['facts_s']} | "
                         f"{cell['retention_rouge_l_s']} | {cell['retention_exact_s']} | {loss} | {flags} |")
        n = len(agg["format"])
        names = ", ".join(t for t in tasks if t in by[method])
        overall.append(f"| {method} | {names} | {statistics.mean(agg['format']):.2f} | "
                       f"{statistics.mean(agg['facts']):.2f} | {statistics.mean(agg['retention_rouge_l']):.2f} | "
                       f"{met_tasks}/{n} |")
    head = ["| method | tasks (means over these) | format | facts kept | retention ROUGE-L | tasks meeting all 3 "
            "targets |", "|---|---|---|---|---|---|"]
    return "\n".join(head + overall) + "\n\nPer task (✓/✗: format ≥ 0.9, facts kept ≥ 0.8, retention ≥ 0.8):\n\n" + \
        "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="base,fewshot,ours")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--split_file", default="bench/results/quality_split.json",
                        help="the subjects the base knows per task (probed and written when missing)")
    parser.add_argument("--out", default="bench/results/quality_runs.jsonl")
    parser.add_argument("--table", metavar="RUNS_JSONL", help="print the summary table of a runs file and exit")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table, encoding="utf-8") as f:
            print(summarize([json.loads(line) for line in f if line.strip()]))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    harness = Harness(args.model, args.steps, args.batch_size, split_file=args.split_file)
    for method in args.methods.split(","):
        for task in args.tasks.split(","):
            for seed in ([0] if METHODS[method]["kind"] in ("base", "fewshot") else args.seeds):
                row = harness.run(method, task, seed)
                print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
