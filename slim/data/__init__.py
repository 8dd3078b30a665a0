"""TruthfulQA, the probe texts, the folds, and the head activations extracted from them.

Modules, in pipeline order:
    truthfulqa   finding, downloading and checking the TruthfulQA files; load_truthfulqa
    probe_texts  each reference answer after its question, labelled truthful or not
    folds        the question order and the folds' train / val / test splits
    activations  batched last-token head activations with an on-disk cache (ProbeData)

The names of the old `slim.data` module are re-exported here.
"""

from .folds import (
    draw_folds,
    make_folds,
    mc_file_problem,
    mc_order,
    ordered_questions,
    question_order,
    questions_and_folds,
    read_mc_questions,
    resolve_question_order,
    save_fold_splits,
)
from .probe_texts import (
    PLAIN_TEXT_FORMAT,
    PROBE_TEXT_FORMAT,
    format_qa,
    probe_texts,
    text_format,
    with_final_punctuation,
)
from .truthfulqa import (
    DEFAULT_BASE_URL,
    TQA_CONTENT_CHECKED,
    TQA_FILES,
    DataUnavailableError,
    damaged_data,
    download_file,
    find_truthfulqa_file,
    load_truthfulqa,
    local_truthfulqa_file,
    sha256_of,
    split_answers,
)

__all__ = [
    "TQA_FILES",
    "TQA_CONTENT_CHECKED",
    "DEFAULT_BASE_URL",
    "DataUnavailableError",
    "sha256_of",
    "download_file",
    "find_truthfulqa_file",
    "local_truthfulqa_file",
    "damaged_data",
    "split_answers",
    "load_truthfulqa",
    "PROBE_TEXT_FORMAT",
    "with_final_punctuation",
    "PLAIN_TEXT_FORMAT",
    "format_qa",
    "text_format",
    "probe_texts",
    "read_mc_questions",
    "mc_file_problem",
    "mc_order",
    "resolve_question_order",
    "question_order",
    "draw_folds",
    "make_folds",
    "save_fold_splits",
    "ordered_questions",
    "questions_and_folds",
]
