"""The staggered root schedule (issue 13) under HSDP (FSDP v1 hybrid sharding), four gloo
ranks on CPU, mesh [[0, 1], [2, 3]] (replicate x shard).

The replicas of a shard split its blocks DDP-style, so each rank balances the blocks it owns
(issue 13: "Under DDP/HSDP each rank balances the blocks it owns"): its phases are the
independent balancing of its own factors, each factor lives on one rank, and each root step
computes exactly the rank's due factors. The parameters equal the plain torch oracle
(tests/oracle.py) on every shard piece with those phases, the replicas of a shard agree
bitwise, and a mid-period DCP checkpoint resumes bitwise. The same for HSDP2 (fully_shard on
the 2-D mesh), whose replicas each compute their whole shard. Harness: test_root_schedule_fsdp.py.
"""

from typing import Any, Dict, List

import pytest

from tests import test_root_schedule_fsdp as H
from tests.test_atomicity import assert_bitwise_equal


@pytest.fixture(scope="module")
def four_ranks() -> List[Dict[str, Any]]:
    return H.spawn(4, ["hsdp", "hsdp2"])


def test_each_rank_balances_the_blocks_it_owns(four_ranks) -> None:
    H.check_phases(four_ranks, "hsdp")
    # shard s is held by ranks s and s + 2, each owning a part of its blocks
    for shard in (0, 1):
        a, b = (four_ranks[r]["hsdp"] for r in (shard, shard + 2))
        assert a["shard"] == b["shard"] == shard
        assert a["factors"] and b["factors"]
        assert {l for l, _, _ in a["factors"]}.isdisjoint({l for l, _, _ in b["factors"]})


def test_equals_oracle_with_the_ranks_phases(four_ranks) -> None:
    H.check_oracle(four_ranks, "hsdp")
    for shard in (0, 1):
        assert_bitwise_equal(four_ranks[shard]["hsdp"]["final"], four_ranks[shard + 2]["hsdp"]["final"],
                             f"replicas of shard {shard}")


def test_mid_period_checkpoint_resumes_bitwise(four_ranks) -> None:
    H.check_resume(four_ranks, "hsdp")


def test_hsdp2_each_replica_balances_its_shards_factors(four_ranks) -> None:
    """fully_shard on the 2-D mesh: each replica computes its whole shard, with the phases of
    that shard's factors (the same on both replicas)."""
    H.check_phases(four_ranks, "hsdp2")


def test_hsdp2_equals_oracle_and_resumes_bitwise(four_ranks) -> None:
    H.check_oracle(four_ranks, "hsdp2")
    H.check_resume(four_ranks, "hsdp2")
    for shard in (0, 1):
        assert_bitwise_equal(four_ranks[shard]["hsdp2"]["final"], four_ranks[shard + 2]["hsdp2"]["final"],
                             f"replicas of shard {shard}")
