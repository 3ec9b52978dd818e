"""The sequential design's error rates under optional stopping, by simulation (no training).

For each design — the one-look 95% interval, the profiles' sequential looks, and for contrast a naive design
that recomputes a 95% interval at every look — and for per-seed effects drawn normal, heavy-tailed (Student
t, 3 degrees of freedom) or skewed (a centred exponential), it simulates many studies of one part of a
claim with a true effect anywhere from the rule's margin to its threshold (where every decision is false in
one direction) and prints the worst rates of a false "holds", a false "refuted" and either. A claim then
runs the next look only while the part is undecided, as ``bnlab study`` does. The rule is expressed in
units of the per-seed spread (threshold 1 sd, margin 0.3 sd); the rates depend only on that ratio.

    python benchmarks/sequential_null.py                 # 20,000 studies per true effect
    python benchmarks/sequential_null.py --studies 100000
"""

from __future__ import annotations

import argparse
import sys
import time

from bnlab.study.claims import CLAIMS
from bnlab.study.profiles import get_profile
from bnlab.study.scope import design as profile_design
from bnlab.study.sequential import Design, false_decision_rate, repeated_95, single


def designs() -> list[tuple[str, object]]:
    out = [("one look, 6 seeds, 95%", single(6)), ("one look, 10 seeds, 95%", single(10))]
    for name in ("quick", "standard"):
        profile = get_profile(name)
        d = profile_design(profile)
        if len(d.looks) > 1:
            out.append((f"{name}: {d.text().split(';')[0]}", d))
        for number, claim in CLAIMS.items():   # a claim's own looks (each of its parts is one such sequence)
            if (profile.get(claim.SLUG) or {}).get("looks"):
                d = profile_design(profile, claim)
                out.append((f"{name}, claim {number}: {d.text().split(';')[0]}", d))
    out.append(("3 looks 6/10/14 (1.5/1.5/2%)", Design((6, 10, 14), (0.015, 0.015, 0.02))))
    out.append(("naive: 95% at each of 6/10/14/18", repeated_95((6, 10, 14, 18))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20_000, help="simulated studies per true effect")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"{'design':<48} {'effects':<8} {'false holds':>11} {'false refuted':>13} {'either':>7}")
    worst_valid = 0.0
    for label, d in designs():
        for noise in ("normal", "t3", "skewed"):
            r = false_decision_rate(d, threshold=1.0, margin=0.3, noise=noise, studies=args.studies, seed=args.seed)
            print(f"{label:<48.48} {noise:<8} {100 * r['false_holds']:>10.2f}% {100 * r['false_refuted']:>12.2f}% "
                  f"{100 * r['false_decision']:>6.2f}%")
            if not label.startswith("naive") and noise != "skewed":
                worst_valid = max(worst_valid, r["false_decision"])
    print(f"\nworst false-decision rate of the valid designs (normal and t3 effects): {100 * worst_valid:.2f}% "
          f"(budget 5%); {args.studies} studies per true effect, {time.perf_counter() - started:.1f} s")
    return 0 if worst_valid <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
