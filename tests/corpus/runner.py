"""Run cases through a transport and judge them: the one loop both transports share."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Protocol

from tests.corpus.cases import Case, RenderedCase, Site, render_case
from tests.corpus.judge import Verdict, judge
from tests.corpus.outcome import Outcome


class Transport(Protocol):
    """Sends one rendered case from the guest's side and reports what every side saw."""

    name: str  # e.g. "local-floor", "live"

    def run(self, rendered: RenderedCase) -> Outcome: ...


@dataclass
class Result:
    rendered: RenderedCase
    outcome: Outcome
    verdict: Verdict


def run_cases(transport: Transport, cases: Iterable[Case], site: Site, *, transport_kind: str,
              rng: random.Random | None = None) -> list[Result]:
    """Every case the transport kind ("local" or "live") can carry, freshly rendered, in order."""
    results = []
    for case in cases:
        if transport_kind not in case.transports:
            continue
        rendered = render_case(case, rng)
        outcome = transport.run(rendered)
        results.append(Result(rendered, outcome, judge(rendered, outcome, site)))
    return results
