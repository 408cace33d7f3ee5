"""bnbench comm: the collectives kernels.SyncBatchNorm issues, recorded in a group of one rank."""

import pytest

from bnbench import comm

C = 6


@pytest.fixture(scope="module")
def measured():
    return comm.measure(channels=C, shape=(3, 2, 3))


def test_collectives_per_phase_are_those_the_design_states(measured):
    """single_pass: one all_gather of (n, pivot, mean, M2) forward; two_pass: an all_gather of
    (n, pivot, sum) and an all_reduce of the centred sums; backward: one all_reduce of 2C;
    the first call only: the group check."""
    assert measured[("single_pass", "forward")] == [("all_gather", 4 * C, 4)]
    assert measured[("two_pass", "forward")] == [("all_gather", 3 * C, 4), ("all_reduce", C, 4)]
    for stats in ("single_pass", "two_pass"):
        assert measured[(stats, "backward")] == [("all_reduce", 2 * C, 4)]
        first = [kind for kind, _, _ in measured[(stats, "first call")]]
        assert first[0] == "all_gather_object" and first.count("all_gather_object") == 1


def test_bytes_per_world_size(measured):
    table = {(r["implementation"], r["phase"], r["world"]): r
             for r in comm.rows(measured, C, (2, 8))}
    gather = table[("kernels single_pass", "forward", 8)]
    assert (gather["sent_bytes"], gather["received_bytes"]) == (4 * C * 4, 7 * 4 * C * 4)
    reduce_ = table[("kernels single_pass", "backward", 2)]
    assert reduce_["sent_bytes"] == reduce_["received_bytes"] == 2 * C * 4  # ring, w = 2
    torch_fwd = table[("torch.nn.SyncBatchNorm (from source)", "forward", 8)]
    assert torch_fwd["values_per_rank"] == 2 * C + 1
