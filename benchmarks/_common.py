"""What the benchmark scripts share: the printed tables and the child-process handling."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


class BenchmarkError(Exception):
    """A step of the benchmark could not run (a child failed, timed out, ...)."""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:,.1f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    print(line(header))
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def heading(text: str) -> None:
    print()
    print(text)
    print("=" * len(text), flush=True)


def die_with_parent() -> None:
    """In a child (before exec, or at its start): get SIGTERM if the benchmark dies, even
    by SIGKILL."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_process_options() -> dict[str, Any]:
    # A session of its own: a Ctrl-C reaches only the benchmark, which stops its children.
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = die_with_parent
    return options


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``grace``; ``group``: to the process group it leads.

    The group is signalled only while its leader is not reaped, so its id cannot have been
    reused by a process this benchmark did not start.
    """
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=grace)


def run_script_child(script: str, args: Sequence[str], timeout: float, what: str) -> str:
    """Run ``python script args…`` in a new process launched through ``/bin/sh``; its stdout.

    Linux carries ``ru_maxrss`` over fork + exec: a child forked straight from the
    benchmark would report the benchmark's own high-water mark instead of its own. The
    shell, a small process, forks the child, so the child's ``ru_maxrss`` is its own.
    """
    command = [
        "/bin/sh",
        "-c",
        '"$@"; exit $?',  # not the last command: the shell forks instead of exec'ing it
        "sh",
        sys.executable,
        script,
        *args,
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        **child_process_options(),
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{what} did not finish in {timeout:g} s") from None
    finally:
        stop_process(proc, group=True)
    if proc.returncode != 0 and not out.strip():
        raise BenchmarkError(f"{what} exited with status {proc.returncode} and no report")
    return out
