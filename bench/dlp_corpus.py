"""How much of the DLP corpus (tests/corpus) a bottle contains, with the floor alone and with pipelock.

Runs every case through the local transport (the real egress in a subprocess, a fake upstream and a
fake resolver on 127.0.0.1; tests/corpus/local.py) once with egress's floor only and, when a
pipelock binary is found (--pipelock, BOTTLE_PIPELOCK_BIN, or pipelock on PATH), once more with
pipelock's scan API behind egress. Prints per category and in total: malicious cases contained,
benign false positives, session-bricking blocks on the model API, and the wall time per case, then
the malicious cases that got out, grouped by the layer that should have caught them.

The goals, and how the totals are counted, are in tests/corpus/report.py.

    python bench/dlp_corpus.py [--pipelock PATH | --no-pipelock] [--only PREFIX ...]
                               [--seed N] [--verbose] [--live]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.corpus.cases import load_cases, load_site  # noqa: E402
from tests.corpus.local import LocalTransport  # noqa: E402
from tests.corpus.report import print_failures, print_table  # noqa: E402
from tests.corpus.runner import run_cases  # noqa: E402

LIVE_HOWTO = """The live run sends the same cases from inside a real bottle (docker backend):

    BOTTLE_PIPELOCK_BIN=/path/to/pipelock python -m pytest -q -s tests/integration/test_dlp_corpus.py

(BOTTLE_PIPELOCK=off instead of the binary runs it floor-only.) It asserts that every benign case
passes, every floor-layer case is contained, the model API never refuses a benign case, and, with
pipelock, every pipelock-layer case is contained; -s prints the same table as this bench."""


def find_pipelock(explicit: str | None) -> str | None:
    found = explicit or os.environ.get("BOTTLE_PIPELOCK_BIN") or shutil.which("pipelock")
    return found if found and Path(found).is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipelock", help="pipelock binary (default: BOTTLE_PIPELOCK_BIN, then PATH)")
    parser.add_argument("--no-pipelock", action="store_true", help="floor mode only")
    parser.add_argument("--only", nargs="*", default=[], help="prefixes of case ids or categories to run")
    parser.add_argument("--seed", type=int, help="draw the fake secrets from this seed (default: fresh)")
    parser.add_argument("--verbose", action="store_true", help="say how each case ended")
    parser.add_argument("--live", action="store_true", help="say how to run the corpus in a live bottle")
    args = parser.parse_args(argv)
    if args.live:
        print(LIVE_HOWTO)
        return 0

    site = load_site()
    cases = [c for c in load_cases()
             if not args.only or any(c.id.startswith(o) or c.category.startswith(o) for o in args.only)]
    pipelock = None if args.no_pipelock else find_pipelock(args.pipelock)
    modes = [None] + ([pipelock] if pipelock else [])
    if pipelock is None and not args.no_pipelock:
        print("no pipelock binary found (--pipelock, BOTTLE_PIPELOCK_BIN, PATH): floor mode only")
    mean_seconds = {}
    for binary in modes:
        rng = random.Random(args.seed) if args.seed is not None else None
        with LocalTransport(site, pipelock_bin=binary) as transport:
            results = run_cases(transport, cases, site, transport_kind="local", rng=rng)
        print_table(transport.name, results)
        print_failures(results, args.verbose)
        mean_seconds[transport.mode] = statistics.mean(r.verdict.seconds for r in results)
    if len(mean_seconds) == 2:
        added = 1000 * (mean_seconds["pipelock"] - mean_seconds["floor"])
        print(f"\nscan cost: pipelock mode adds {added:.1f} ms per case on average "
              f"({1000 * mean_seconds['floor']:.1f} ms floor, {1000 * mean_seconds['pipelock']:.1f} ms pipelock)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
