"""Issue 19: hostile and broken neighbours, each reproduced, with what survived and what was lost.

Runs every part (``abuse_*.py`` beside this file, one per kind of abuse) and prints one table:
for each scenario what was tried, what held, what was lost, the target and PASS/FAIL. Only
127.0.0.1 is used; every loop is bounded and stops by itself. Postgres scenarios run when
``SYNCD_TEST_POSTGRES_URL`` is set (each makes a throwaway database and drops it).

    python benchmarks/abuse.py                 # everything
    python benchmarks/abuse.py --quick         # smaller sizes
    python benchmarks/abuse.py --only poison   # one part: poison, server, shutdown, locks,
                                               # refused, config
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# The parts import syncd and benchmarks._common (or _common, run on their own).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import heading, print_table, verdict

PARTS = ("poison", "server", "shutdown", "locks", "refused", "config")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for part in args.only or PARTS:
        heading(f"abuse: {part}")
        started = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.abuse_{part}")
            found = module.run(quick=args.quick)
        except Exception:  # one part failing must not hide the others' figures
            traceback.print_exc()
            found = [
                {
                    "item": part,
                    "tried": "-",
                    "survived": "the part itself failed (traceback above)",
                    "lost": "?",
                    "target": "-",
                    "ok": False,
                }
            ]
        print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
        rows += found
    heading("abuse: summary")
    print_table(
        ("item", "tried", "survived", "lost", "target", "verdict"),
        [
            (
                str(r["item"]),
                str(r["tried"]),
                str(r["survived"]),
                str(r["lost"]),
                str(r["target"]),
                verdict(bool(r["ok"])),
            )
            for r in rows
        ],
    )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
