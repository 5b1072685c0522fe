"""Run the sandbox WooCommerce store alone: ``python -m syncd.sandbox``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import API_PREFIX, FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m syncd.sandbox",
        description="Serve a generated WooCommerce store (wc/v3 REST API) until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8899, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--guests", type=int, default=150)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--currency", default="USD")
    parser.add_argument("--timezone", default="America/New_York")
    parser.add_argument("--key", default="ck_sandbox", help="consumer key")
    parser.add_argument("--secret", default="cs_sandbox", help="consumer secret")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-5xx", type=float, default=0.0)
    parser.add_argument("--rate-drop", type=float, default=0.0)
    parser.add_argument(
        "--unstable-ties",
        action="store_true",
        help="order rows sharing a modification second randomly per request (as HPOS does)",
    )
    parser.add_argument(
        "--clock-skew-seconds",
        type=float,
        default=0.0,
        help="the store's clock ahead of the real one (negative: behind)",
    )
    parser.add_argument(
        "--destinations",
        action="store_true",
        help="also serve the Klaviyo, Mailchimp and webhook sandboxes",
    )
    parser.add_argument("--destinations-port", type=int, default=8898, help="0 picks a free one")
    parser.add_argument("--klaviyo-key", default="pk_sandbox")
    parser.add_argument("--klaviyo-list", default="Sbx001", help="a Klaviyo list to create")
    parser.add_argument("--mailchimp-key", default="0123456789abcdef0123456789abcdef-us1")
    parser.add_argument("--mailchimp-list", default="sandbox", help="a Mailchimp list to create")
    parser.add_argument(
        "--webhook-secret", default="whsec_sandbox", help="secret of /webhook/default"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = FaultConfig(
            latency_ms=args.latency_ms,
            rate_429=args.rate_429,
            rate_5xx=args.rate_5xx,
            rate_drop=args.rate_drop,
            seed=args.seed,
            unstable_ties=args.unstable_ties,
        )
        store = SandboxStore(
            seed=args.seed,
            customers=args.customers,
            guests=args.guests,
            orders=args.orders,
            products=args.products,
            currency=args.currency,
            timezone=args.timezone,
            clock_skew=timedelta(seconds=args.clock_skew_seconds),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = SandboxServer(
        store,
        consumer_key=args.key,
        consumer_secret=args.secret,
        faults=faults,
        host=args.host,
        port=args.port,
    )
    try:
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    destinations: DestinationSandbox | None = None
    if args.destinations:
        destinations = DestinationSandbox(
            klaviyo_key=args.klaviyo_key,
            mailchimp_key=args.mailchimp_key,
            host=args.host,
            port=args.destinations_port,
            # A long-running sandbox would otherwise keep every body it was sent.
            log_bodies=False,
        )
        destinations.klaviyo.add_list(args.klaviyo_list)
        destinations.mailchimp.add_list(args.mailchimp_list)
        destinations.webhooks.add("default", args.webhook_secret)
        try:
            destinations.start()
        except OSError as exc:
            server.stop()
            print(
                f"error: cannot listen on {args.host}:{args.destinations_port}: {exc}",
                file=sys.stderr,
            )
            return 1

    stopped = threading.Event()
    # From here on Ctrl-C, which may come while the banner is printed, stops the servers:
    # their threads would otherwise keep the process from exiting.
    try:
        # SIGTERM (docker stop, systemd) ends the process as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        banner = [
            f"WooCommerce sandbox store: {server.url}",
            f"REST API:                  {server.url}{API_PREFIX}",
            f"consumer key:              {args.key}",
            f"consumer secret:           {args.secret}",
            f"{len(store.customers)} customers, {len(store.orders)} orders, "
            f"{len(store.products)} products; Ctrl-C to stop",
        ]
        if destinations is not None:
            banner += [
                f"Klaviyo base_url:          {destinations.klaviyo_url}",
                f"  api key / list:          {args.klaviyo_key} / {args.klaviyo_list}",
                f"Mailchimp base_url:        {destinations.mailchimp_url}",
                f"  api key / list:          {args.mailchimp_key} / {args.mailchimp_list}",
                f"Webhook URL:               {destinations.webhook_url('default')}",
                f"  secret:                  {args.webhook_secret}",
            ]
        print("\n".join(banner), flush=True)
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if destinations is not None:
            destinations.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
