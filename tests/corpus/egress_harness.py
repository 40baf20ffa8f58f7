"""The real egress (egress.main, the launcher the bundle runs) with the harness's DNS and dialling.

    python -m tests.corpus.egress_harness --harness harness.json -- <egress arguments>

Two things differ from the bundle, and only these:

- name resolution answers from the harness's table (``dns``: name or ``*.domain`` -> addresses)
  and records every name egress asks for (a ``harness_dns`` line on egress's log), so the corpus
  can tell whether a secret in a host name reached a resolver;
- after egress has pinned a connection to the address it checked, that address is mapped onto a
  loopback port of the fake upstream (``dial``: "address|port" -> [host, port]). An address not in
  the table is refused, so nothing outside 127.0.0.1 is ever dialled, whatever egress decides.

Everything else (routes, DLP, pipelock's scan API, TLS, mitmproxy's options) is egress's own code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bottle_tasks.sidecars import egress
from tests.corpus.cases import literal_address

REFUSED = "harness_unmapped_destination"


def lookup(table: dict[str, list[str]], host: str) -> list[str]:
    """The table's answer for host: an exact name, else the longest matching "*.domain", else none."""
    host = host.rstrip(".").lower()
    if host in table:
        return list(table[host])
    wildcards = [name for name in table if name.startswith("*.") and host.endswith(name[1:])]
    return list(table[max(wildcards, key=len)]) if wildcards else []


def harness_egress(harness: dict):
    """An egress.Egress subclass bound to the harness tables; it replaces egress.Egress in main()."""
    dns, dial = harness["dns"], harness["dial"]

    class HarnessEgress(egress.Egress):
        def __init__(self, *args, **kwargs):
            kwargs["resolve"] = self._resolve
            super().__init__(*args, **kwargs)

        async def _resolve(self, host: str, port: int) -> list[str]:
            literal = literal_address(host)
            if literal is not None:
                return [literal]  # no lookup: getaddrinfo parses literals itself
            self.emit({"event": "harness_dns", "host": host})
            return lookup(dns, host)

        def server_connect(self, data) -> None:
            super().server_connect(data)
            if data.server.error or data.server.address is None:
                return
            address, port = str(data.server.address[0]), int(data.server.address[1])
            target = dial.get(f"{address}|{port}")
            if target is None:
                data.server.error = REFUSED
                self.emit({"event": "harness_refused", "host": address, "port": port})
                return
            data.server.address = (target[0], int(target[1]))

    return HarnessEgress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.corpus.egress_harness")
    parser.add_argument("--harness", required=True, type=Path, help="JSON with the dns and dial tables")
    parser.add_argument("egress_args", nargs=argparse.REMAINDER, help="-- then egress's own arguments")
    args = parser.parse_args(argv)
    harness = json.loads(args.harness.read_text())
    egress.Egress = harness_egress(harness)  # run_proxy builds its addon from this name
    rest = args.egress_args[1:] if args.egress_args[:1] == ["--"] else args.egress_args
    return egress.main(rest)


if __name__ == "__main__":
    sys.exit(main())
