"""The built extension is on the LibTorch stable ABI: no C++ symbol of torch imported, abi3
file names, so one build loads on every torch >= 2.10 and CPython >= 3.10."""
import glob
import os
import shutil
import subprocess

import pytest

import moe_ext

PACKAGE = os.path.dirname(moe_ext.__file__)
LIBRARIES = sorted(glob.glob(os.path.join(PACKAGE, "_C*.so")))
TORCH_CXX = ("c10::", "at::", "torch::", "caffe2::")


def imported_symbols(path: str) -> list[str]:
    """The undefined dynamic symbols of a shared library, demangled."""
    nm = subprocess.run(["nm", "-D", "--undefined-only", path], check=True, capture_output=True,
                        text=True).stdout
    names = [line.split()[-1] for line in nm.splitlines() if line.strip()]
    return subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True,
                          text=True).stdout.splitlines()


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None,
                    reason="needs binutils (nm, c++filt)")
@pytest.mark.parametrize("path", LIBRARIES, ids=os.path.basename)
def test_no_torch_cxx_symbol_imported(path):
    torch_cxx = [s for s in imported_symbols(path) if s.startswith(TORCH_CXX) or
                 any(f" {ns}" in s or f"({ns}" in s for ns in TORCH_CXX)]
    assert not torch_cxx, f"{os.path.basename(path)} imports torch C++ symbols: {torch_cxx[:10]}"
    assert any(s.startswith(("aoti_torch_", "torch_")) for s in imported_symbols(path)), \
        "expected the stable C shim (aoti_torch_* / torch_*) to be what the library calls"


def test_libraries_are_abi3():
    names = [os.path.basename(p) for p in LIBRARIES]
    assert "_C.abi3.so" in names, names
    assert all(n.endswith(".abi3.so") for n in names), names
