"""Eigenvalue-corrected Shampoo (SOAP, issue 14) under the staggered schedule (issue 13) with
FSDP (v1), FSDP2 and DDP, two gloo ranks on CPU: each rank balances its own factors' eigenbases
(the independent balancing of tests/test_root_schedule.py) and recomputes exactly the due ones;
the parameters equal the plain torch SOAP oracle (tests/soap_oracle.py, root_phases) on every
shard piece (DDP: parameter) with those phases, and a mid-period DCP checkpoint resumes
bitwise. eigh under FSDP, QR (DefaultSOAPConfig, warm-started) under FSDP2 and DDP (whose
ranks split the blocks, so each factor's eigenbasis lives on one rank). Harness:
test_root_schedule_fsdp.py.
"""

from typing import Any, Dict, List

import pytest

from tests import test_root_schedule_fsdp as H

MODES = ["fsdp+eigh", "fsdp2+qr", "ddp+qr"]


@pytest.fixture(scope="module")
def two_ranks() -> List[Dict[str, Any]]:
    return H.spawn(2, MODES)


@pytest.mark.parametrize("mode", MODES)
def test_soap_each_rank_balances_its_own_eigenbases(two_ranks, mode: str) -> None:
    H.check_phases(two_ranks, mode)


@pytest.mark.parametrize("mode", MODES)
def test_soap_equals_oracle_with_the_ranks_phases(two_ranks, mode: str) -> None:
    H.check_oracle(two_ranks, mode)


@pytest.mark.parametrize("mode", MODES)
def test_soap_mid_period_checkpoint_resumes_bitwise(two_ranks, mode: str) -> None:
    H.check_resume(two_ranks, mode)
