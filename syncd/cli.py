"""The ``syncd`` command.

Exit codes: 0 done; 1 the run failed (partial row failures are counted, not fatal);
2 usage or configuration error, printed as ``file: key: what was expected``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from syncd import __version__
from syncd.config import (
    ConfigError,
    Settings,
    load_settings,
    nothing_to_do,
    resolve_config_path,
)
from syncd.log import configure_logging

app = typer.Typer(
    name="syncd",
    help="Reverse-ETL for WooCommerce: sync the store, build segments, push them to your tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a message line is never broken at the terminal width (file: key: expected
# lines must stay one line in logs and pipes); tables still fit the terminal.
err = Console(stderr=True, soft_wrap=True)
out = Console()


def say(line: str) -> None:
    """A plain line on stdout, never wrapped or styled."""
    print(line, flush=True)


class State:
    config: str | None = None
    log_level: str | None = None
    log_format: str | None = None


state = State()


def _version(value: bool) -> None:
    if value:
        print(f"syncd {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="Config file (default: $SYNCD_CONFIG, else ./config.toml)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, json or console.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    state.config, state.log_level, state.log_format = config, log_level, log_format


def fail_config(exc: ConfigError) -> typer.Exit:
    for line in str(exc).splitlines():
        err.print(line, markup=False, highlight=False)
    return typer.Exit(2)


def load() -> Settings:
    """Every command starts here: validated settings, logging set up, or exit 2."""
    try:
        settings = load_settings(resolve_config_path(state.config))
    except ConfigError as exc:
        raise fail_config(exc) from None
    configure_logging(
        state.log_level or settings.log.level,
        state.log_format or settings.log.format,  # type: ignore[arg-type]
    )
    return settings


def open_engine(settings: Settings) -> Any:
    from syncd.store.engine import StoreError, open_store

    try:
        return open_store(settings.store.url)
    except StoreError as exc:
        err.print(f"store: {exc}", markup=False)
        raise typer.Exit(1) from None


@app.command()
def validate() -> None:
    """Check the config and mapping files: settings, segment rules, mappings, and SQL segments
    and SQL models against the store."""
    settings = load()
    path = settings.config_path or "config"
    if (empty := nothing_to_do(settings)) is not None:
        raise fail_config(ConfigError([(str(path), *empty)]))
    if any(seg.sql is not None for seg in settings.segments.values()):
        # SQL segments can only be checked by running them (with LIMIT 0) on the store.
        from syncd.segments.memberships import SegmentError, check_sql_segments

        engine = open_engine(settings)
        try:
            check_sql_segments(engine, settings.segments)
        except SegmentError as exc:
            err.print(f"{path}: {exc}", markup=False)
            raise typer.Exit(2) from None
        finally:
            engine.dispose()
    mappings = load_mappings_or_exit(settings)
    if any(sync.spec.sql is not None for m in mappings for sync in m.syncs):
        from syncd.push import PushError, check_model

        engine = open_engine(settings)
        try:
            for mapping in mappings:
                for sync in mapping.syncs:
                    check_model(engine, sync)
        except PushError as exc:
            err.print(f"{mapping.path}: {exc}", markup=False)
            raise typer.Exit(2) from None
        finally:
            engine.dispose()
    sources = ", ".join(settings.sources) or "none"
    syncs = ", ".join(s.name for m in mappings for s in m.syncs) or "none"
    say(f"{path}: ok (sources: {sources}; destination syncs: {syncs})")
    from syncd.mapping import consent_rule

    ad_syncs = [(m, s) for m in mappings for s in m.syncs if m.adapter.min_audience is not None]
    warnings: dict[str, str] = {}
    if ad_syncs:
        # The policy pre-flight: an audience below the platform's minimum serves no ads.
        from syncd.push import preflight

        engine = open_engine(settings)
        try:
            for mapping, sync in ad_syncs:
                if (warning := preflight(engine, sync, mapping.adapter)) is not None:
                    warnings[sync.name] = warning
        finally:
            engine.dispose()
    for mapping in mappings:
        for sync in mapping.syncs:
            # Whom each sync may reach: the consent it needs, and where that is read.
            say(f"{sync.name}: {consent_rule(sync, settings)}")
            if sync.name in warnings:
                say(f"warning: {warnings[sync.name]}")
            asked = sync.spec.batch_size
            if asked is not None and asked > sync.batch_size:
                say(
                    f"{mapping.path}: sync[{sync.name}].batch_size: {asked} capped at "
                    f"{mapping.spec.destination}'s maximum of {sync.batch_size}"
                )


meta_app = typer.Typer(help="Meta Custom Audiences: make an audience for a mapping.")
app.add_typer(meta_app, name="meta")


@meta_app.command("create-audience")
def meta_create_audience(
    name: Annotated[str, typer.Argument(help="The new audience's name in Ads Manager.")],
    description: Annotated[
        str | None, typer.Option(help="Its description (default: made by syncd).")
    ] = None,
    mapping: Annotated[
        str | None,
        typer.Option(help="The Meta mapping's name, when the config has more than one."),
    ] = None,
) -> None:
    """Create a customer-list custom audience in the mapping's [options] ad_account_id and
    print its id, to put as a sync's `object`."""
    from syncd.destinations.meta import MetaDestination
    from syncd.http import ApiError

    settings = load()
    metas = [
        m
        for m in load_mappings_or_exit(settings)
        if m.adapter is MetaDestination and (mapping is None or m.name == mapping)
    ]
    if len(metas) != 1:
        what = "no Meta mapping" if not metas else "several Meta mappings (use --mapping)"
        err.print(f"meta create-audience: {what} in the config", markup=False)
        raise typer.Exit(2)

    async def create() -> str:
        adapter = metas[0].open()
        try:
            assert isinstance(adapter, MetaDestination)
            return await adapter.create_audience(name, description)
        finally:
            await adapter.aclose()

    try:
        audience = asyncio.run(create())
    except (ValueError, ApiError) as exc:
        err.print(f"meta create-audience: {exc}", markup=False)
        raise typer.Exit(1) from None
    say(audience)


def load_mappings_or_exit(settings: Settings) -> list[Any]:
    """The config's mapping files, checked; exit 2 listing every problem."""
    from syncd.mapping import load_mappings

    try:
        return load_mappings(settings)
    except ConfigError as exc:
        raise fail_config(exc) from None


def _progress_factory() -> tuple[Progress | None, Callable[[str, int, int | None], None] | None]:
    if not sys.stderr.isatty():
        return None, None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(stream: str, done: int, total: int | None) -> None:
        if stream not in tasks:
            tasks[stream] = progress.add_task(stream, total=total)
        progress.update(tasks[stream], completed=done, total=total)

    return progress, update


async def run_sources(
    settings: Settings,
    engine: Any,
    names: Sequence[str],
    full: bool,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> list[Any]:
    from syncd.ingest import SourceSync

    results = []
    for name in names:
        sync = SourceSync(
            engine, name, settings.sources[name], progress=progress, consent=settings.consent
        )
        try:
            results.append(await sync.run(full=full))
        finally:
            await sync.client.aclose()
    return results


@app.command()
def sync(
    sources: Annotated[
        list[str] | None, typer.Argument(help="Sources to sync (default: all).")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Re-read everything, not just what changed.")
    ] = False,
) -> None:
    """Run source syncs once."""
    settings = load()
    names = list(sources or settings.sources)
    unknown = [n for n in names if n not in settings.sources]
    if unknown or not names:
        where = settings.config_path or "config"
        known = ", ".join(settings.sources) or "none configured"
        what = f"unknown source {unknown[0]!r}" if unknown else "no source configured"
        err.print(f"{where}: sources: {what} (configured: {known})", markup=False)
        raise typer.Exit(2)
    engine = open_engine(settings)
    progress, update = _progress_factory()
    try:
        if progress is not None:
            with progress:
                results = asyncio.run(run_sources(settings, engine, names, full, update))
        else:
            results = asyncio.run(run_sources(settings, engine, names, full))
    finally:
        engine.dispose()
    failed = False
    for result in results:
        quarantined = sum(c.quarantined for c in result.counts.values())
        stored = sum(c.stored for c in result.counts.values())
        line = (
            f"{result.source}: {result.status}: {stored} rows stored, "
            f"{quarantined} quarantined, {result.requests} requests"
        )
        if result.error:
            line += f": {result.error}"
            failed = True
        if result.error:
            err.print(line, markup=False, highlight=False)
        else:
            say(line)
    raise typer.Exit(1 if failed else 0)


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Cursors, last runs and row counts per source stream."""
    from syncd.status import collect_status

    settings = load()
    engine = open_engine(settings)
    try:
        data = collect_status(engine, settings)
    finally:
        engine.dispose()
    if json_output:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_status(data)


def print_status(data: dict[str, Any]) -> None:
    table = Table(title=f"syncd status ({data['store']['dialect']}: {data['store']['url']})")
    for col in ("source", "stream", "rows", "deleted", "quarantined", "cursor", "reconciled"):
        table.add_column(
            col, justify="right" if col in ("rows", "deleted", "quarantined") else "left"
        )
    for name, src in data["sources"].items():
        for stream, s in src["streams"].items():
            table.add_row(
                name,
                stream,
                str(s["rows"]),
                str(s["deleted"]),
                str(s["quarantined"]),
                s["cursor"] or "-",
                s["reconciled_at"] or "-",
            )
    out.print(table)
    for name, src in data["sources"].items():
        if src["last_run"]:
            say(_run_line(f"{name}: last run", src["last_run"]))
    totals = data["totals"]
    say(
        f"people: {totals['customers']}  live orders: {totals['orders']}  "
        f"quarantined: {totals['quarantined']}  profiles: {totals['profiles']}"
    )
    segs = data["segments"]
    if segs["sizes"]:
        say("segments: " + "  ".join(f"{n}: {v['size']}" for n, v in segs["sizes"].items()))
    if segs["last_run"]:
        say(_run_line("segments: last recompute", segs["last_run"]))
    for name, dest in data.get("destinations", {}).items():
        held = dest["records"]
        line = (
            f"push {name}: {held['in_destination']} in destination, "
            f"{held['failed']} failed, {held['skipped']} skipped"
        )
        if held.get("given_up"):
            line += f", {held['given_up']} given up (syncd push --retry-failed {name})"
        run = dest["last_run"]
        if run:
            c = run["counts"]
            counts = " ".join(
                f"{k}={c.get(k, 0)}"
                for k in ("added", "updated", "removed", "unchanged", "failed", "skipped")
            )
            line += "; " + _run_line("last run", run) + f" [{counts}]"
        say(line)
        if run and run["counts"].get("match"):
            say(f"push {name}: {match_line(run['counts']['match'])}")
    for step in data.get("privacy", {}).get("pending_steps", []):
        say(
            f"privacy request {step['request']} ({step['requested_by']}, "
            f"{step['requested_at']}): {step['step']} {step['status']} after "
            f"{step['attempts']} attempt(s)"
            + (f": {step['last_error']}" if step["last_error"] else "")
        )


# The identifier kinds an ad platform's match report counts, as a user reads them.
_CARRYING_LABELS = {"email": "email", "phone": "phone", "name_postcode": "name + postcode"}


def match_line(match: dict[str, Any]) -> str:
    """An ad platform's report of a run in words: rows it received, rows it found invalid,
    and the share of rows carrying each identifier kind (what the match rate is made of)."""
    received = int(match.get("received", 0))
    line = f"match: {received} rows received, {match.get('invalid', 0)} invalid"
    carrying = match.get("carrying") or {}
    if received and carrying:
        shares = ", ".join(
            f"{_CARRYING_LABELS.get(kind, kind)} {100 * n / received:.0f}%"
            for kind, n in sorted(carrying.items())
        )
        line += f"; carrying {shares}"
    return line


def _run_line(what: str, run: dict[str, Any]) -> str:
    """``what success at <time> (<duration> s)[: error]`` for a run in the status JSON."""
    when = run["finished_at"] or run["started_at"]
    line = f"{what} {run['status']} at {when} ({run['duration_s']} s)"
    return f"{line}: {run['error']}" if run["error"] else line


@app.command()
def push(
    syncs: Annotated[
        list[str] | None, typer.Argument(help="Destination syncs to run (default: all).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and sample payloads; send nothing.")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="Forget what was sent and send every row again.")
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Send the rows the destination refused now, given up or waiting to retry.",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run destination syncs once: send what changed since the last push. Exits 1 when a
    sync failed, including one whose every row sent was refused."""
    from syncd.push import push as run_push
    from syncd.push import select_syncs

    settings = load()
    mappings = load_mappings_or_exit(settings)
    try:
        selected = select_syncs(mappings, syncs)
    except KeyError as exc:
        known = ", ".join(s.name for m in mappings for s in m.syncs) or "none configured"
        where = settings.config_path or "config"
        err.print(
            f"{where}: destinations: unknown sync {exc.args[0]!r} (configured: {known})",
            markup=False,
        )
        raise typer.Exit(2) from None
    if not selected:
        where = settings.config_path or "config"
        err.print(f"{where}: destinations.mappings: no destination sync configured", markup=False)
        raise typer.Exit(2)
    engine = open_engine(settings)
    try:
        results = asyncio.run(
            run_push(engine, selected, dry_run=dry_run, full=full, retry_failed=retry_failed)
        )
    finally:
        engine.dispose()
    if json_output:
        print(json.dumps([r.as_json() for r in results], indent=2, sort_keys=True, default=str))
    else:
        print_push(results)
    raise typer.Exit(1 if any(r.status == "failed" for r in results) else 0)


@app.command()
def forget(
    email: Annotated[str | None, typer.Argument(help="The person's email address.")] = None,
    customer: Annotated[
        int | None,
        typer.Option("--customer", help="The person's customer id at the source (WooCommerce)."),
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="The source the --customer id belongs to.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Erase a person: a deletion at every destination, their personal data removed from
    the store (orders keep their amounts), and a suppression entry so no sync re-adds
    them. Prints a receipt per step; exits 1 while a step is pending (run it again, or
    let the service retry), 0 when all are done."""
    from syncd.privacy import PrivacyError
    from syncd.privacy import forget as run_forget

    if (email is None) == (customer is None):
        err.print("forget: give an EMAIL or --customer ID (one of them)", markup=False)
        raise typer.Exit(2)
    settings = load()
    mappings = load_mappings_or_exit(settings)
    engine = open_engine(settings)
    try:
        result = asyncio.run(
            run_forget(engine, mappings, email, customer, source=source, requested_by="cli")
        )
    except PrivacyError as exc:
        err.print(f"forget: {exc}", markup=False)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    if json_output:
        print(json.dumps(result.as_json(), indent=2, sort_keys=True))
    else:
        say(f"privacy request {result.request}:")
        for step in result.steps:
            text = step.detail if step.status in ("done", "not_applicable") else step.last_error
            receipt = f" [receipt {step.receipt}]" if step.receipt else ""
            say(f"  {step.name}: {step.status}{receipt}: {text or '-'}")
        if not result.done:
            say("some steps are pending: run syncd forget again, or let syncd run retry them")
    raise typer.Exit(0 if result.done else 1)


@app.command()
def export(
    email: Annotated[str, typer.Argument(help="The person's email address.")],
) -> None:
    """Print everything the store holds about a person as JSON, and where it was sent."""
    from syncd.privacy import PrivacyError
    from syncd.privacy import export as run_export

    settings = load()
    mappings = load_mappings_or_exit(settings)
    engine = open_engine(settings)
    try:
        document = run_export(engine, email, mappings=mappings, requested_by="cli")
    except PrivacyError as exc:
        err.print(f"export: {exc}", markup=False)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    print(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))


def print_push(results: Sequence[Any]) -> None:
    dry = any(r.status == "dry-run" for r in results)
    table = Table(title="push (dry run: nothing sent)" if dry else "push")
    heads = ("sync", "destination", "mode", "status")
    numbers = (
        "added",
        "updated",
        "removed",
        "unchanged",
        "failed",
        "retrying",
        "given_up",
        "skipped",
        "requests",
    )
    for col in heads + numbers:
        # Sync names are what a user types next (syncd push NAME): never cut them.
        table.add_column(col, justify="right" if col in numbers else "left", no_wrap=col == "sync")
    for r in results:
        c = r.counts
        table.add_row(
            r.sync,
            r.destination,
            r.mode,
            r.status,
            *(str(getattr(c, n)) for n in numbers),
        )
    out.print(table)
    for r in results:
        for warning in r.warnings:
            say(f"warning: {warning}")
        if r.error:
            err.print(f"{r.sync}: failed: {r.error}", markup=False, highlight=False)
        if r.counts.match is not None and r.status != "dry-run":
            say(f"{r.sync}: {match_line(r.counts.match.as_json())}")
        for reason, n in r.counts.failed_reasons.most_common(5):
            say(f"{r.sync}: {n} refused: {reason}")
        for reason, n in r.counts.skipped_reasons.most_common(5):
            say(f"{r.sync}: {n} skipped: {reason}")
        if r.counts.given_up:
            say(
                f"{r.sync}: {r.counts.given_up} rows given up after repeated refusals: "
                f"`syncd push --retry-failed {r.sync}` sends them again"
            )
        if r.status == "dry-run":
            plan = ", ".join(f"{op} {n}" for op, n in sorted(r.planned.items())) or "nothing"
            say(f"{r.sync}: would send: {plan}")
            for sample in r.samples:
                say(f"{r.sync}: sample {sample['op']} {json.dumps(sample['payload'], default=str)}")


@app.command()
def run() -> None:
    """The service: scheduled syncs, recomputes and pushes, store webhooks, and the HTTP
    side (/healthz, /readyz, /metrics, /status), until SIGTERM or SIGINT."""
    from syncd.service import serve

    settings = load()
    mappings = load_mappings_or_exit(settings)
    engine = open_engine(settings)
    try:
        code = asyncio.run(serve(engine, settings, mappings))
    finally:
        engine.dispose()
    raise typer.Exit(code)


def _parse_day(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        err.print(f"--as-of: expected a date YYYY-MM-DD, got {value!r}", markup=False)
        raise typer.Exit(2) from None


def run_segments(settings: Settings, engine: Any, as_of: date | None = None) -> Any:
    """Recompute; a definition that cannot run exits 2 (file: key: …), a failure exits 1."""
    from syncd.segments.recompute import ProfileError, SegmentError, recompute

    try:
        return recompute(engine, settings, as_of)
    except (ProfileError, SegmentError) as exc:
        err.print(f"{settings.config_path or 'config'}: {exc}", markup=False)
        raise typer.Exit(2) from None
    except Exception as exc:
        err.print(f"segments: failed: {exc!r}", markup=False)
        raise typer.Exit(1) from None


@app.command()
def segments(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            metavar="DATE",
            help="Compute as of the end of this UTC day (YYYY-MM-DD): a backtest. "
            "Nothing is recorded: profiles, memberships and model fits stay as the "
            "last recompute left them.",
        ),
    ] = None,
) -> None:
    """Recompute profiles and segments; print sizes, changes and the fitted models."""
    settings = load()
    day = _parse_day(as_of)
    engine = open_engine(settings)
    try:
        result = run_segments(settings, engine, day)
    finally:
        engine.dispose()
    if json_output:
        print(json.dumps(result.as_json(), indent=2, sort_keys=True))
    else:
        print_segments(result)


def print_segments(result: Any) -> None:
    title = f"segments as of {result.as_of.isoformat()}"
    if not result.written:
        title += " (backtest: nothing recorded)"
    table = Table(title=title)
    for col in ("segment", "size", "entered", "exited"):
        table.add_column(col, justify="left" if col == "segment" else "right")
    for name, change in result.segments.items():
        table.add_row(name, str(change.size), f"+{change.entered}", f"-{change.exited}")
    out.print(table)
    say(f"profiles: {result.profiles} ({result.buyers} buyers), currency {result.currency or '-'}")
    bg, gg = result.models.get("bgnbd", {}), result.models.get("gamma_gamma", {})
    if bg.get("r") is not None:
        say(
            f"BG/NBD (days): r={bg['r']:.4g} alpha={bg['alpha']:.4g} a={bg['a']:.4g} "
            f"b={bg['b']:.4g} log-likelihood={bg['log_likelihood']:.6g}"
        )
    else:
        say(f"BG/NBD: not fitted: {bg.get('error')}")
    if gg.get("p") is not None:
        say(f"Gamma-Gamma: p={gg['p']:.4g} q={gg['q']:.4g} v={gg['v']:.4g}")
    else:
        say(f"Gamma-Gamma: not fitted: {gg.get('error')}")


# The demo's segments: a taste of the rule language and of an exclusive group.
DEMO_SEGMENTS: dict[str, dict[str, Any]] = {
    "champions": {"rule": "rfm_segment = 'champions'"},
    "open_carts": {"rule": "has_open_cart and cart_value_minor > 0"},
    "big_spenders": {"rule": "net_revenue_minor >= 50000"},
    "win_back": {
        "rule": "lifecycle_stage in ('at_risk', 'lapsed')",
        "group": "lifecycle",
        "priority": 2,
    },
    "welcome": {"rule": "lifecycle_stage = 'new'", "group": "lifecycle", "priority": 1},
    "quiet_for_90_days": {"rule": "last_order_at < now() - 90d", "group": "lifecycle"},
}


@app.command()
def demo(
    orders: Annotated[int, typer.Option(help="Orders in the sandbox store.")] = 2000,
    store_url: Annotated[
        str, typer.Option(help="Where the demo store lives.")
    ] = "sqlite:///state/demo.db",
) -> None:
    """The whole loop against the sandboxes, on the embedded store: sync, segments, push."""
    from pydantic import SecretStr

    from syncd.config import StoreSettings, WooCommerceSourceSettings
    from syncd.sandbox.server import SandboxServer
    from syncd.sandbox.store import SandboxStore

    configure_logging(state.log_level or "warning", state.log_format or "auto")  # type: ignore[arg-type]
    demo_db = (
        Path(store_url.removeprefix("sqlite:///")) if store_url.startswith("sqlite:///") else None
    )
    if demo_db is not None:  # a fresh demo each time
        for suffix in ("", "-wal", "-shm"):
            Path(f"{demo_db}{suffix}").unlink(missing_ok=True)
    say(f"Generating a sandbox WooCommerce store with {orders} orders…")
    store = SandboxStore(seed=7, orders=orders)
    with SandboxServer(store) as server:
        say(f"Sandbox store at {server.url}/wp-json/wc/v3 (OAuth 1.0a over plain HTTP)")
        source = WooCommerceSourceSettings(
            url=server.url,
            consumer_key=SecretStr(server.consumer_key),
            consumer_secret=SecretStr(server.consumer_secret),
        )
        settings = Settings(
            store=StoreSettings(url=store_url),
            sources={"sandbox": source},
            segments=DEMO_SEGMENTS,
        )
        engine = open_engine(settings)
        try:
            progress, update = _progress_factory()
            if progress is not None:
                with progress:
                    results = asyncio.run(run_sources(settings, engine, ["sandbox"], False, update))
            else:
                results = asyncio.run(run_sources(settings, engine, ["sandbox"], False))
            if any(r.error for r in results):
                raise typer.Exit(1)
            say("Recomputing profiles and segments…")
            print_segments(run_segments(settings, engine))
            from syncd.status import collect_status

            say("Pushing segments to sandboxed Klaviyo, Mailchimp, the store and a webhook…")
            from syncd.sandbox.demo import demo_push

            pushed, where = demo_push(engine, DEMO_SEGMENTS, server)
            print_push(pushed)
            for line in where:
                say(line)
            print_status(collect_status(engine, settings))
            if any(r.status == "failed" for r in pushed):
                raise typer.Exit(1)
        finally:
            engine.dispose()
    say(f"Done. The store is {store_url}; query it with any SQL client.")


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("COLUMNS", str(shutil.get_terminal_size((120, 20)).columns))
    app(args=list(argv) if argv is not None else None, prog_name="syncd")


if __name__ == "__main__":
    main()
