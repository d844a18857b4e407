"""Builds moe_ext._C: the C++ CPU kernels always, the CUDA kernels in csrc/cuda/ when nvcc
and a CUDA build of torch are present (MOE_EXT_CUDA=0|1 forces the choice).
MOE_EXT_NO_EXT=1 installs the Python package only (the Makefile's editable install, which
is followed by an in-place incremental build of the extension). MOE_EXT_SANITIZE=1 builds the
CPU kernels only, with AddressSanitizer and UndefinedBehaviorSanitizer (`make test-asan`)."""
import glob
import logging
import os
import shutil

from setuptools import setup


def find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper such as /usr/local/bin/nvcc
    makes it guess /usr/local, which has no CUDA libraries. Prefer a real toolkit folder."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/x/y")))]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            return home
    return None


if "CUDA_HOME" not in os.environ and find_cuda_home():
    os.environ["CUDA_HOME"] = find_cuda_home()

# without a GPU torch logs "No CUDA runtime is found" at import: expected here (the CUDA
# sources still compile), so not printed in every build
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

HERE = os.path.dirname(os.path.abspath(__file__))


SANITIZE = os.environ.get("MOE_EXT_SANITIZE") == "1"
# Every error aborts (-fno-sanitize-recover); -fno-wrapv undoes Python's -fwrapv so that signed
# overflow is undefined again and UBSan reports it.
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer", "-fno-wrapv", "-g1", "-DMOE_EXT_NO_SIMD_CLONES"]


def want_cuda() -> bool:
    if SANITIZE:
        return False
    forced = os.environ.get("MOE_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    import torch

    macros = [("MOE_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]  # psabi: internal 32-byte vector helpers
    if not want_cuda():
        if SANITIZE:  # -O1: fast enough to run the op tests, quicker to build
            cxx = ["-O1", "-fopenmp", "-Wno-psabi"] + SANITIZER_FLAGS
        return cpp_extension.CppExtension(
            "moe_ext._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] + (SANITIZER_FLAGS if SANITIZE else []),
        )
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # sm_80 (A100) and sm_90a (H100/H200, Hopper-only instructions) unless the user asks
    # for their own list through TORCH_CUDA_ARCH_LIST.
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    archs = arch_list or "sm_80;sm_90a"
    if not arch_list:
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    macros += [("MOE_EXT_WITH_CUDA", "1"), ("MOE_EXT_CUDA_ARCHS", f'"{archs}"')]
    return cpp_extension.CUDAExtension(
        "moe_ext._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[] if os.environ.get("MOE_EXT_NO_EXT") == "1" else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
