"""Fuzz and fault test of the C entry points (issue 16): seeded, bounded batches of hostile
calls (tests/fuzz_c_cases.py) run in subprocesses, so that a crash is counted instead of
killing the test run. Passes when no call crashed, every failing call raised TypeError,
ValueError or OverflowError (the argument parser's refusal of an int too large for C), and
every refused call left each buffer it was given bitwise unchanged.

SHAMPOO_FUZZ_CASES (default 16000) and SHAMPOO_FUZZ_SEED (default 16) scale and vary the
run; the figures are printed (pytest -s) and README's "Reliability" section quotes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from distributed_shampoo import _backend as B

# The binding itself, below _backend's Python checks: what these tests aim at.
_C = B._C

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fuzz_c_cases.py")
CASES = int(os.environ.get("SHAMPOO_FUZZ_CASES", "16000"))
SEED = int(os.environ.get("SHAMPOO_FUZZ_SEED", "16"))
BATCHES = 4
MAX_RESTARTS = 25  # per batch: a crashing build still finishes in bounded time
WORKER_TIMEOUT = 240  # s per worker run; a batch takes ~10 s (~40 s under the sanitizers)


def _run_batch(start: int, count: int) -> dict:
    """Runs cases [start, start + count) in workers; a worker that dies is restarted after
    the case it died on (read from its progress file), which is counted as a crash."""
    total: dict = {"cases": 0, "accepted": 0, "refused": 0, "atomicity_checks": 0,
                   "atomicity_failures": [], "unexpected": [], "crashes": [], "per_entry": {}}
    end = start + count
    with tempfile.TemporaryDirectory() as tmp:
        progress = os.path.join(tmp, "progress")
        for _ in range(MAX_RESTARTS + 1):
            if start >= end:
                break
            try:
                proc = subprocess.run(
                    [sys.executable, WORKER, str(SEED), str(start), str(end - start), progress],
                    capture_output=True, text=True, cwd=HERE, timeout=WORKER_TIMEOUT,
                )
            except subprocess.TimeoutExpired:  # a hang (unbounded work) counts as a crash
                proc = subprocess.CompletedProcess([], "timeout", "", "hung")
            if proc.returncode == 0:
                stats = json.loads(proc.stdout.strip().splitlines()[-1])
                for key in ("cases", "accepted", "refused", "atomicity_checks"):
                    total[key] += stats[key]
                total["atomicity_failures"] += stats["atomicity_failures"]
                total["unexpected"] += stats["unexpected"]
                for name, n in stats["per_entry"].items():
                    total["per_entry"][name] = total["per_entry"].get(name, 0) + n
                break
            try:
                with open(progress) as f:
                    died = int(f.read() or start)
            except FileNotFoundError:  # died before its first case (at import): say so
                died = start
            if proc.returncode == "timeout" and died == start:
                raise AssertionError(f"fuzz worker made no progress in {WORKER_TIMEOUT} s from case {start}")
            total["crashes"].append(f"case {died}: rc {proc.returncode}: {proc.stderr[-300:]}")
            total["cases"] += died - start + 1  # cases before it ran but are not classified
            start = died + 1
    return total


def test_hostile_calls_into_C_never_crash_and_refuse_cleanly():
    per = -(-CASES // BATCHES)
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: two workers at a time
        results = list(pool.map(lambda b: _run_batch(b * per, per), range(BATCHES)))
    total = {key: sum(r[key] for r in results) for key in
             ("cases", "accepted", "refused", "atomicity_checks")}
    crashes = [c for r in results for c in r["crashes"]]
    unexpected = [u for r in results for u in r["unexpected"]]
    atomicity = [a for r in results for a in r["atomicity_failures"]]
    entries = set().union(*(r["per_entry"] for r in results))
    print(f"\nfuzz: {total['cases']} cases (seed {SEED}), {total['refused']} refused cleanly, "
          f"{total['accepted']} accepted, {len(crashes)} crashes, {len(unexpected)} other "
          f"exceptions; {total['atomicity_checks']} atomicity checks, {len(atomicity)} failed")
    assert crashes == [], crashes[:5]
    assert unexpected == [], unexpected[:10]
    assert atomicity == [], atomicity[:10]
    assert total["cases"] == BATCHES * per
    # every entry point of _C was called, and most hostile calls were refused
    public = {n for n in dir(_C) if callable(getattr(_C, n)) and not n.startswith("_")}
    assert public <= entries, sorted(public - entries)
    assert total["refused"] > total["cases"] // 2


@pytest.mark.parametrize("seed", [0, 1])
def test_cases_are_reproducible_from_the_seed(seed):
    sys.path.insert(0, HERE)
    import fuzz_c_cases

    a = fuzz_c_cases.run_batch(seed, 0, 60)
    b = fuzz_c_cases.run_batch(seed, 0, 60)
    assert a == b and a["cases"] == 60
