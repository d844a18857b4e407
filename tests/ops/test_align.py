"""moe_ext::align: stable counting sort of (token, k) pairs by expert, on every device."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_ext import ops, reference


def check_invariants(experts, num_bins, order, offsets):
    flat = experts.flatten()
    P = flat.numel()
    assert torch.equal(torch.sort(order).values, torch.arange(P))  # a permutation
    counts = torch.bincount(flat, minlength=num_bins)
    assert offsets[0] == 0
    assert torch.equal(offsets[1:], torch.cumsum(counts, 0))  # offsets = cumsum(counts)
    for b in range(num_bins):
        seg = order[offsets[b]:offsets[b + 1]]
        assert (flat[seg] == b).all()
        assert (seg[1:] > seg[:-1]).all()  # stable: pair order kept inside an expert


@pytest.mark.parametrize("T,K,bins", [(1, 1, 1), (10, 2, 4), (333, 3, 17), (5000, 2, 8),
                                      (20000, 2, 1030), (65536, 2, 1024), (777, 4, 1)])
def test_align_matches_reference_and_invariants(device, T, K, bins):
    """Stable, so the order is unique: bitwise equal to the reference."""
    experts = torch.randint(0, bins, (T, K), generator=torch.Generator().manual_seed(T))
    order, offsets = (t.cpu() for t in ops.align(experts.to(device), bins))
    want_order, want_offsets = reference.align(experts, bins)
    assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)
    check_invariants(experts, bins, order, offsets)


def test_align_empty_and_single_expert(device):
    experts = torch.full((50, 2), 3, device=device)
    order, offsets = ops.align(experts, 6)
    assert offsets.tolist() == [0, 0, 0, 0, 100, 100, 100]
    assert torch.equal(order.cpu(), torch.arange(100))


def test_align_is_independent_of_thread_count():
    experts = torch.randint(0, 64, (40000, 2))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.align(experts, 64)
    finally:
        torch.set_num_threads(n)
    many = ops.align(experts, 64)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("bad", [-1, 4])
def test_align_rejects_out_of_range_ids(bad):
    experts = torch.zeros(5, 2, dtype=torch.long)
    experts[3, 1] = bad
    with pytest.raises(ValueError, match="experts"):
        ops.align(experts, 4)


def test_align_rejects_bad_dtype_and_bins():
    with pytest.raises(RuntimeError, match="experts"):
        ops.align(torch.zeros(5, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="num_bins"):
        ops.align(torch.zeros(5, 2, dtype=torch.long), 0)


def test_align_opcheck(device):
    torch.library.opcheck(torch.ops.moe_ext.align.default,
                          (torch.randint(0, 5, (7, 2), device=device), 5))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 300), K=st.integers(1, 4), bins=st.integers(1, 50))
def test_align_random(T, K, bins):
    experts = torch.randint(0, bins, (T, K))
    order, offsets = ops.align(experts, bins)
    check_invariants(experts, bins, order, offsets)


@pytest.mark.parametrize("bins", [2**24 + 1, 2**31, 2**62, 2**63 - 1])
def test_align_refuses_huge_num_bins_before_allocating(bins):
    """align(num_bins=2**31) asked for ~24 GB, 2**63 - 1 overflowed num_bins + 1."""
    with pytest.raises(ValueError, match="num_bins"):
        ops.align(torch.zeros(3, 2, dtype=torch.long), bins)
    with pytest.raises(ValueError, match="num_bins"):
        ops.align(torch.zeros(3, 2, dtype=torch.long, device="meta"), bins)


def test_align_many_bins_few_pairs():
    """The histogram has one chunk when bins outnumber pairs: 2**20 bins cost 8 MB, not 16."""
    experts = torch.tensor([[5, 2**20 - 1], [5, 0]])
    order, offsets = ops.align(experts, 2**20)
    want = reference.align(experts, 2**20)
    assert torch.equal(order, want[0]) and torch.equal(offsets, want[1])
