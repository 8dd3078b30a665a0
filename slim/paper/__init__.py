"""The paper's artefacts.

Modules:
    index     python -m slim.paper: the index of reproduce.sh's artefacts and the README's generated section
    across_models  Table 1 across models (python -m slim.paper.across_models ...)
    figures   Figure 2 (python -m slim.paper.figures sweep ...)
    examples  Table 5 (python -m slim.paper.examples ...)
    timing    Table 4's components: stage 1's probes of one layer, one head's map, ITI's fit
    overhead  Table 4's inference overhead, paired plain / edited batches
    table4    Table 4's device line and markdown
    nq_open   NQ-open questions and the gold match
    transfer  the TruthfulQA-fitted policies on NQ-open

The names of the old `slim.paper` module are re-exported here.
"""

from .index import (
    ARTEFACTS,
    BEGIN,
    END,
    artefacts,
    main,
    results_section,
    update_readme,
    write_index,
)

__all__ = [
    "BEGIN",
    "END",
    "ARTEFACTS",
    "artefacts",
    "write_index",
    "results_section",
    "update_readme",
    "main",
]
