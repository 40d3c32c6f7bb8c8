"""``benchmarks.tensor_memory``: the tensors' peak of a call, by known allocation patterns."""

import torch

from benchmarks.tensor_memory import live_tensor_bytes, tensor_peak

MB = 2**20


def test_the_peak_is_the_highest_level_not_the_sum_of_allocations():
    def call():
        for _ in range(5):  # 5 x 8 MiB allocated, at most 2 alive at once
            a = torch.ones(2 * MB)
            b = a * 2
            del a, b

    result = tensor_peak(call)
    assert result["kind"] == "cpu_tensor_peak"
    assert 16 * MB <= result["delta_bytes"] < 17 * MB
    assert result["peak_bytes"] == result["live_bytes"] + result["delta_bytes"]


def test_tensors_alive_before_the_call_count_once():
    kept = [torch.zeros(MB), torch.zeros(MB)]
    view = kept[0][: MB // 2]  # a view shares its base's storage
    before = live_tensor_bytes()
    assert before >= 8 * MB
    result = tensor_peak(lambda: None)
    assert result["delta_bytes"] == 0 and result["live_bytes"] == before
    del kept, view
    assert live_tensor_bytes() <= before - 8 * MB


def test_a_tensor_the_call_returns_and_drops_counts_at_its_peak():
    result = tensor_peak(lambda: torch.ones(4 * MB).sum())
    assert 16 * MB <= result["delta_bytes"] < 17 * MB


def test_tensors_without_data_are_skipped():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(MB)  # no storage to count: its data pointer cannot be read
    meta = torch.empty(MB, device="meta")
    assert live_tensor_bytes() >= 0
    del fake, meta
