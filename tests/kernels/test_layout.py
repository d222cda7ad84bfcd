"""Load-time preparation shared by the kernels (kernels/layout.py)."""

from __future__ import annotations

import torch

from gptq_plugin.kernels.layout import group_order, unpack_codes
from gptq_plugin.packing import unpack_qweight
from kernel_harness import make_layer


def test_sequential_g_idx_needs_no_permutation():
    order = group_order(torch.arange(257, dtype=torch.int32) // 100, 100)
    assert order.perm is None and order.group_size == 100
    assert group_order(torch.zeros(37, dtype=torch.int32), -1).group_size == 37


def test_act_order_is_sorted_stably_into_uniform_groups():
    layer = make_layer(257, 13, 4, 32, act_order=True)
    order = group_order(layer.g_idx, 32)
    assert order.perm is not None and order.group_size == 32
    assert torch.equal(order.g_idx, layer.g_idx.long()[order.perm])
    assert torch.equal(order.g_idx, torch.arange(257) // 32)
    for g in range(order.g_idx.max() + 1):  # stable: channels of a group keep their order
        chans = order.perm[order.g_idx == g]
        assert torch.equal(chans, chans.sort().values)
    codes = unpack_codes(layer, order)
    assert torch.equal(codes, unpack_qweight(layer.qweight, 4, 257)[order.perm])


def test_unequal_groups_are_reported():
    g = torch.tensor([1, 0, 0, 2, 2, 2, 1], dtype=torch.int32)
    order = group_order(g, 2)
    assert order.group_size is None
    assert order.g_idx.tolist() == [0, 0, 1, 1, 2, 2, 2]
