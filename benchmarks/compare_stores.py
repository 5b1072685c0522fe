"""Compare two syncd stores table by table: the before/after check of a refactor.

    python benchmarks/compare_stores.py URL_A URL_B

Typical use: run ``syncd demo --store-url URL_A`` on the old code and
``syncd demo --store-url URL_B`` on the new, then compare. Every table and every row is
compared, sorted, with what differs between two runs of the same code left out: surrogate
ids, syncd's own clock (``*_at`` columns and today's times inside values), the sandboxes'
ports, the Klaviyo sandbox's generated ids, and the content hash of a time-stamped event.
Prints each table's row count and, for a table that differs, a row from each side; exits 1
when the stores differ.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, inspect, text

SKIPPED_COLUMNS = ("id", "run_id", "as_of")
TODAY = datetime.now(UTC).strftime("%Y-%m-%d")


def _canonical(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    return value


def _row(values: Any) -> str:
    line = json.dumps([_canonical(v) for v in values], default=str)
    line = re.sub(r"127\.0\.0\.1:\d+", "HOST", line)
    line = re.sub(r'"01[0-9A-HJKMNP-TV-Z]{24}"', '"ULID"', line)
    line = re.sub(TODAY + r"[T ][0-9:.]+(Z|\+00:00)?", "NOW", line)
    # An event's key and content hash cover its time, which is the run's own.
    return re.sub(r'("[^"]*@NOW", )-?\d+', r"\1DIGEST", line)


def dump(url: str) -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    engine = create_engine(url)
    with engine.connect() as conn:
        for table in sorted(inspect(conn).get_table_names()):
            if table == "alembic_version":
                continue
            columns = [
                c["name"]
                for c in inspect(conn).get_columns(table)
                if c["name"] not in SKIPPED_COLUMNS and not c["name"].endswith("_at")
            ]
            quoted = ", ".join(f'"{c}"' for c in columns)
            rows = conn.execute(text(f'SELECT {quoted} FROM "{table}"'))
            tables[table] = sorted(_row(r) for r in rows)
    engine.dispose()
    return tables


def main() -> int:
    first, second = dump(sys.argv[1]), dump(sys.argv[2])
    same = True
    for table in sorted(set(first) | set(second)):
        a, b = first.get(table, []), second.get(table, [])
        mark = "same" if a == b else "DIFFERENT"
        print(f"{table:<24} {len(a):>8} {len(b):>8}  {mark}")
        if a != b:
            same = False
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            for label, rows in (("<", only_a), (">", only_b)):
                if rows:
                    print(f"  {label} {rows[0][:240]}")
    print("the stores are equal" if same else "the stores differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
