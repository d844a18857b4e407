"""Builds the extension on PyTorch's LibTorch stable ABI, so one build loads on every
torch >= 2.10 and every CPython >= 3.10 (abi3):
  moe_ext._C       the op schemas and the C++ CPU kernels, always;
  moe_ext._C_cuda  the CUDA host code and kernels of csrc/cuda/, when nvcc and a CUDA build
                   of torch are present (MOE_EXT_CUDA=0|1 forces the choice).
CUDA archs: SASS for sm_80 and sm_90a plus compute_80 PTX (newer GPUs JIT it), unless
MOE_EXT_CUDA_ARCHS (e.g. "80;90a;100;120+PTX") or TORCH_CUDA_ARCH_LIST names others.
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


# The stable ABI of torch 2.10, and nothing else of torch's C++ (non-stable headers are a
# compile error); Py_LIMITED_API comes with py_limited_api=True.
STABLE_ABI = [("TORCH_TARGET_VERSION", "0x020a000000000000"), ("TORCH_STABLE_ONLY", None)]
DEFAULT_ARCHS = "80;90a;80+PTX"  # SASS sm_80, sm_90a; compute_80 PTX for newer GPUs


def cuda_arch_flags() -> tuple[list[str], str]:
    """nvcc -gencode flags and the arch list they build. An arch "NN" is SASS for sm_NN,
    "NN+PTX" adds compute_NN PTX as well."""
    archs = os.environ.get("MOE_EXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = (archs or DEFAULT_ARCHS).replace(" ", ";").replace(".", "")
    flags = []
    for arch in filter(None, archs.split(";")):
        number = arch.removesuffix("+PTX")
        if not number.rstrip("af").isdigit():
            raise ValueError(f"MOE_EXT_CUDA_ARCHS: {arch!r} is not an arch such as 80, 90a or 100+PTX")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return sorted(set(flags), key=flags.index), archs


def extensions():
    import torch

    macros = STABLE_ABI + [("MOE_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-fopenmp-simd", "-Wno-psabi"]  # omp simd pragmas only; psabi: 32-byte vectors
    if SANITIZE:  # -O1: fast enough to run the op tests, quicker to build
        cxx = ["-O1", "-fopenmp-simd", "-Wno-psabi"] + SANITIZER_FLAGS
    cpu = cpp_extension.CppExtension(
        "moe_ext._C", sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
        define_macros=macros, extra_compile_args={"cxx": cxx}, py_limited_api=True,
        extra_link_args=SANITIZER_FLAGS if SANITIZE else [],
    )
    if not want_cuda():
        return [cpu]
    gencode, archs = cuda_arch_flags()
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode
    cuda = cpp_extension.CUDAExtension(
        "moe_ext._C_cuda",
        sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
        define_macros=macros + [("USE_CUDA", None), ("MOE_EXT_CUDA_ARCHS", f'"{archs}"')],
        extra_compile_args={"cxx": ["-O3", "-Wno-psabi"], "nvcc": nvcc},
        py_limited_api=True,
    )
    return [cpu, cuda]


setup(
    ext_modules=[] if os.environ.get("MOE_EXT_NO_EXT") == "1" else extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # the abi3 wheel tag
)
