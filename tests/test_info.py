"""`moe-ext info`'s account of the CUDA build: SASS and PTX archs, and how a GPU runs them."""
from unittest import mock

import pytest
import torch

from moe_ext import info


def test_arch_list_parsed_into_sass_and_ptx():
    archs = info.cuda_archs("80;90a;80+PTX")
    assert archs["sass"] == ["sm_80", "sm_90a"]
    assert archs["ptx"] == ["compute_80"]


@pytest.mark.parametrize("built, capability, expected", [
    ("80;90a;80+PTX", (9, 0), "sm_90: SASS sm_90a"),       # H100 / H200
    ("80;90a;80+PTX", (8, 9), "sm_89: SASS sm_80"),        # Ada runs sm_80 SASS
    ("80;90a;80+PTX", (10, 0), "sm_100: PTX compute_80 (JIT-compiled at first use)"),
    ("80;90a;80+PTX", (12, 0), "sm_120: PTX compute_80 (JIT-compiled at first use)"),
    ("80;90a;100;120;80+PTX", (12, 0), "sm_120: SASS sm_120"),
    ("90a", (10, 0), "sm_100: no kernel image"),           # arch-specific SASS, no PTX
    ("80;90a;80+PTX", (7, 5), "sm_75: no kernel image"),   # older than every arch built
])
def test_how_a_gpu_runs_the_build(built, capability, expected):
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        assert info.cuda_archs(built)["this_gpu"] == expected


def test_build_info_names_the_cuda_archs():
    facts = info.build_info()
    assert facts["stable_abi_target"] == "2.10"
    if facts["built_with_cuda"]:
        assert facts["cuda_sass"] and facts["built_cuda_archs"]
    else:
        assert facts["cuda_sass"] == [] and facts["cuda_this_gpu"] is None
