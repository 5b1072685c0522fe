"""The push engine: a sync's rows out to its destination, sending only what changed.

``rows`` reads a sync's rows (a segment's members with the columns their source
contributes, or a SQL model) and hashes them; ``engine`` diffs them against what was sent,
sends the difference in batches (halving a refused batch to find its bad rows) and
records each row's outcome. Neither names a source or a destination: a source brings its
columns through `PushColumns`, a destination is a `syncd.destinations` adapter.
"""

from syncd.push.engine import (
    PushCounts,
    PushResult,
    masked_payload,
    preflight,
    push,
    push_sync,
    select_syncs,
)
from syncd.push.rows import PushColumns, PushError, check_model

__all__ = [
    "PushColumns",
    "PushCounts",
    "PushError",
    "PushResult",
    "check_model",
    "masked_payload",
    "preflight",
    "push",
    "push_sync",
    "select_syncs",
]
