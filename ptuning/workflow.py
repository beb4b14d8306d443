"""The training command, start to end: parse → validate → load → patch → data → train → export → predict."""

from __future__ import annotations

import logging

logger = logging.getLogger("ptuning")


def train_and_predict(argv: list[str]) -> None:
    import torch
    from transformers import set_seed

    import ptuning
    from ptuning import distributed
    from ptuning.args import parse_args
    from ptuning.data import ColumnSpec, encode_dataset, load_rows, validate_rows
    from ptuning.infer import preview, print_prompt_reply, run_predict
    from ptuning.nlu import is_nlu_run
    from ptuning.train import check_output_dir, run_training
    from ptuning.validate import validate_run

    distributed.prepare(argv)
    model_args, prefix_args, data_args, training_args = parse_args(argv)
    if is_nlu_run(model_args):
        from ptuning.nlu.run import run_nlu
        from ptuning.validate import validate_flags

        validate_flags(model_args, prefix_args, data_args, training_args, torch.cuda.is_available(),
                       distributed.world_size())
        return run_nlu(model_args, prefix_args, data_args, training_args)
    validate_run(model_args, prefix_args, data_args, training_args, torch.cuda.is_available(),
                 distributed.world_size())
    columns = ColumnSpec(data_args.prompt_column, data_args.response_column, data_args.history_column,
                         data_args.messages_column)
    paths = [p for p in (data_args.train_file, data_args.validation_file, data_args.test_file) if p]
    validated = {p: validate_rows(load_rows(p), columns, p) for p in paths}
    if training_args.do_train:
        check_output_dir(training_args)

    set_seed(training_args.seed)  # a fresh prefix starts from the same values on every rank and every run
    model, tokenizer = ptuning.load_from_args(model_args, prefix_args, for_training=training_args.do_train)
    preview_file = data_args.test_file or data_args.validation_file
    no_generation = distributed.generation_skipped(training_args)  # only rank 0 generates, and not under ZeRO-3
    if no_generation:
        data_args.preview_samples = 0
        if distributed.is_main_process() and (training_args.do_predict or data_args.prompt):
            logger.warning("not generating: %s", no_generation)
    if training_args.do_train:
        lengths = (data_args.max_source_length, data_args.max_target_length)
        train_set = encode_dataset(validated[data_args.train_file], data_args.train_file, tokenizer, *lengths)
        eval_set = None
        if data_args.validation_file:
            eval_set = encode_dataset(validated[data_args.validation_file], data_args.validation_file, tokenizer,
                                      *lengths)
        with model.prefix_disabled():
            before = preview(model, tokenizer, preview_file, columns, data_args, "before training (base model)")
        run_training(model, tokenizer, train_set, eval_set, training_args)
        preview(model, tokenizer, preview_file, columns, data_args, "after training", before)
    if training_args.do_predict and not no_generation:
        run_predict(model, tokenizer, data_args, columns, training_args)
    if data_args.prompt and not no_generation:
        print_prompt_reply(model, tokenizer, data_args)
