"""Evaluators: retrieval and zero-shot on cached latents, for any pair of modalities.

Each evaluator is one module that registers itself with `register_evaluator` and returns an
`Evaluation` (numbers plus the tables and figure of its report) without writing anything;
`evaluate(kind, run, stores, **options)` runs one by name. The app writes results
(`alignpipe.app.results`). To add an evaluator, add a module here and import it below; pure
metrics live in `metrics`, encoder-pair similarity (CKA, mutual kNN) in `similarity`.
"""

from alignpipe.evaluate.common import (
    ALL_ROWS,
    CLASS_EMBEDDINGS,
    CONFUSION_MAX_CLASSES,
    EVAL_SPLITS,
    QUERY_CHUNK,
    open_space,
    output_path,
    result_name,
    store_tag,
)
from alignpipe.evaluate.registry import (
    COMMON_OPTIONS,
    EVALUATORS,
    Evaluation,
    EvaluatorSpec,
    Figure,
    Table,
    eval_options,
    evaluate,
    evaluator_spec,
    list_evaluators,
    register_evaluator,
)

# The evaluators: importing each registers it.
from alignpipe.evaluate.retrieval import compute_retrieval
from alignpipe.evaluate.zeroshot import class_key, class_scores, compute_zeroshot

__all__ = [
    "ALL_ROWS", "CLASS_EMBEDDINGS", "COMMON_OPTIONS", "CONFUSION_MAX_CLASSES", "EVALUATORS",
    "EVAL_SPLITS", "QUERY_CHUNK", "Evaluation", "EvaluatorSpec", "Figure", "Table", "class_key",
    "class_scores", "compute_retrieval", "compute_zeroshot", "eval_options", "evaluate",
    "evaluator_spec", "list_evaluators", "open_space", "output_path",
    "register_evaluator", "result_name", "store_tag",
]
