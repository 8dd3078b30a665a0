"""Answering TruthfulQA.

Modules, in the order an answer is made:
    prompts     the instruction, the QA primer, qa_prompt, the answer rule (extract_answer, answer_closed)
    prefix      PrefixCache: the shared prompt's key/value cache, computed once per answer file
    decoding    batched greedy decoding that stops a row once its answer is closed
    answers     answer files: answer_questions (resumable, never reused under another policy or model; on a GPU
                the batch fits free memory and is halved on running out of it)
    likelihood  MC1/MC2 and CE/KL from the model's log-probabilities
"""

from .answers import (
    ANSWER_COLUMNS,
    AnsweringOutOfMemory,
    answer_questions,
    answers_source,
    batch_that_fits,
    bytes_per_row,
    source_path,
)
from .decoding import (
    generate_greedy,
    greedy_answer_tokens,
    greedy_tokens,
    logit_settings,
)
from .prefix import (
    PrefixCache,
    cache_argument,
    left_pad,
    returned_cache,
    tokenizer_pad_id,
)
from .prompts import (
    INSTRUCTION,
    QA_PRIMER,
    answer_closed,
    extract_answer,
    qa_prompt,
    shared_prefix,
)

__all__ = [
    "INSTRUCTION",
    "QA_PRIMER",
    "qa_prompt",
    "shared_prefix",
    "extract_answer",
    "answer_closed",
    "logit_settings",
    "greedy_answer_tokens",
    "greedy_tokens",
    "generate_greedy",
    "ANSWER_COLUMNS",
    "answers_source",
    "source_path",
    "answer_questions",
    "AnsweringOutOfMemory",
    "batch_that_fits",
    "bytes_per_row",
    "tokenizer_pad_id",
    "left_pad",
    "cache_argument",
    "returned_cache",
    "PrefixCache",
]
