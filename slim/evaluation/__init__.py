"""Scoring answers and summarising runs.

Modules:
    metrics   True*Info, SEM, degeneracy, summary files
    evaluate  answering and scoring a method on every fold (evaluate_method), load_scorers
    sweep     python -m slim.evaluation.sweep: the knob chosen on the validation questions
    reports   python -m slim.evaluation.reports: the comparison table, one judge per table

The names of the old `slim.evaluation` module are re-exported here.
"""

from .evaluate import (
    MethodResult,
    Scorers,
    evaluate,
    evaluate_method,
    evaluate_methods,
    fold_average,
    format_row,
    load_scorers,
    policy_folder,
    scored_path,
    split_questions,
)

__all__ = [
    "Scorers",
    "load_scorers",
    "scored_path",
    "evaluate",
    "fold_average",
    "format_row",
    "split_questions",
    "policy_folder",
    "MethodResult",
    "evaluate_method",
    "evaluate_methods",
]
