"""The check that a stage's declared columns are the ones it writes: run it, compare
`added_columns()` with the columns its output has beyond its input."""

from __future__ import annotations

import pyarrow as pa

from warren.stages.base import POSITION_COLUMN
from warren.stages.schema import EMBEDDING_DECLARED, REJECT_COLUMN, is_embedding_type

#: Columns the runner's machinery adds, not the stage's data.
MACHINERY = {REJECT_COLUMN, POSITION_COLUMN}


def assert_adds_what_it_declares(stage, before: pa.Schema, after: pa.Schema) -> None:
    """Every column the stage added is declared, with the type it has; every declared column is
    in the output (a re-run may overwrite a column the input already had)."""
    declared = stage.added_columns()
    new = {f.name for f in after if f.name not in before.names and f.name not in MACHINERY}
    assert new <= set(declared), f"{stage.name} writes undeclared {sorted(new - set(declared))}"
    for name, declared_type in declared.items():
        assert name in after.names, f"{stage.name} declares {name} and does not write it"
        written = after.field(name).type
        if declared_type == EMBEDDING_DECLARED:
            assert is_embedding_type(written), (stage.name, name, written)
        else:
            assert written == declared_type, (stage.name, name, written, declared_type)
