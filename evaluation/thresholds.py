"""Decision rules as evaluation names them: tuned on validation, applied unchanged to test.

The rules, their tuning and `apply_rule` live in `models.decision` (one definition, shared
with the training metrics and the export graph); this module only re-exports them for
evaluation code.
"""

from models.decision import (  # noqa: F401  (re-exports)
    GRID,
    apply_cutpoints,
    apply_rule,
    binary_rule,
    default_rule,
    expected_grade,
    label_threshold,
    multilabel_rule,
    ordinal_rule,
    tune_rule,
)
