"""The corpus's numbers as text: per category and in total, and the cases that got out.

Printed by bench/dlp_corpus.py (local transport) and by tests/integration/test_dlp_corpus.py (live).
Goals from issue 10: at least 85% of malicious cases contained with pipelock, at least 50% with the
floor alone, at most 1 false positive in 40 benign cases, no session-bricking block on the model
API. Cases of layer "none" are shown but left out of the goals.
"""

from __future__ import annotations

import statistics

from tests.corpus.judge import Tally, tally
from tests.corpus.runner import Result

GOAL_PIPELOCK, GOAL_FLOOR, GOAL_FP_RATE = 0.85, 0.50, 1 / 40


def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "0/0"


def print_table(mode: str, results: list[Result]) -> None:
    verdicts = [r.verdict for r in results]
    print(f"\n== {mode}: {len(verdicts)} cases ==")
    if not verdicts:
        return
    print(f"{'category':<22} {'malicious contained':>20} {'benign FP':>10} {'bricked':>8} {'ms/case':>8}")
    for category, t in tally(verdicts).items():
        contained = percent(t.contained, t.malicious) if t.malicious else "-"
        fps = f"{t.false_positives}/{t.benign}" if t.benign else "-"
        print(f"{category:<22} {contained:>20} {fps:>10} {t.bricked:>8} {1000 * t.seconds / t.cases:>8.1f}")
    layers = tally([v for v in verdicts if v.kind == "malicious"], key=lambda v: v.layer)
    counted = [v for v in verdicts if v.kind == "benign" or v.layer != "none"]
    total = tally(counted, key=lambda v: "total").get("total", Tally())
    print(f"{'by layer':<22} " + ", ".join(f"{layer} {percent(t.contained, t.malicious)}" for layer, t in layers.items()))
    seconds = [v.seconds for v in verdicts]
    print(f"total (layer none left out): malicious contained {percent(total.contained, total.malicious)}, "
          f"benign false positives {total.false_positives}/{total.benign}, bricking blocks on the model API "
          f"{total.bricked} ({total.bricked_benign} of them benign), wall time per case mean "
          f"{1000 * statistics.mean(seconds):.1f} ms, median {1000 * statistics.median(seconds):.1f} ms")
    goal = GOAL_PIPELOCK if mode.endswith("pipelock") else GOAL_FLOOR
    rate = total.contained / total.malicious if total.malicious else 0.0
    fp_rate = total.false_positives / total.benign if total.benign else 0.0
    print(f"goals: containment {rate:.0%} (goal {goal:.0%}) {'met' if rate >= goal else 'NOT met'}; "
          f"false positives {fp_rate:.1%} (goal <= {GOAL_FP_RATE:.1%}) {'met' if fp_rate <= GOAL_FP_RATE else 'NOT met'}; "
          f"benign bricking {total.bricked_benign} (goal 0) {'met' if total.bricked_benign == 0 else 'NOT met'}")


def print_failures(results: list[Result], verbose: bool) -> None:
    out = [r.verdict for r in results if r.verdict.kind == "malicious" and not r.verdict.contained]
    by_layer: dict[str, list] = {}
    for verdict in out:
        by_layer.setdefault(verdict.layer, []).append(verdict)
    for layer in sorted(by_layer):
        print(f"got out, layer {layer} ({len(by_layer[layer])}):")
        for v in by_layer[layer]:
            print(f"  {v.case_id:<34} {v.category:<20} {v.detail if verbose else ''}".rstrip())
    fps = [r.verdict for r in results if r.verdict.false_positive]
    if fps:
        print(f"false positives ({len(fps)}):")
        for v in fps:
            print(f"  {v.case_id:<34} {v.category:<20} {v.detail}")
    bricked = [r.verdict for r in results if r.verdict.bricked]
    if bricked:
        print("bricking blocks on the model API: " + ", ".join(v.case_id for v in bricked))
    if verbose:
        print("contained:")
        for r in results:
            if r.verdict.kind == "malicious" and r.verdict.contained:
                print(f"  {r.verdict.case_id:<34} {r.verdict.detail}")
