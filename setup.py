"""Builds hvae_fast._C: the C++ (CPU) kernels always, the CUDA kernels when asked.

Environment:
  HVAE_FAST_CUDA=auto|1|0   auto (default): CUDA kernels when torch is a CUDA build and
                            nvcc is found; 1: required (fails clearly without nvcc);
                            0: CPU only.
  HVAE_FAST_CPU=auto|avx2|generic
                            SIMD level of the CPU kernels. auto: AVX2+FMA when the
                            building machine has them (the extension refuses to load on
                            a CPU without them).
  HVAE_FAST_SANITIZE=1      build the C++ kernels with -fsanitize=address,undefined
                            (tools/sanitize.sh runs the op tests against such a build).
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, DEBUG=1, CUDA_HOME   as for any torch extension.
Install with `pip install --no-build-isolation .` so it builds against your torch.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    sys.exit(f"hvae_fast build: {msg}")


try:
    import torch
except ImportError:
    fail("PyTorch must be installed first, and the install must use --no-build-isolation:\n"
         "  pip install torch && pip install --no-build-isolation .")


def find_cuda_home():
    """The CUDA toolkit: CUDA_HOME, else /usr/local/cuda, else the one around nvcc.

    torch's own guess takes `which nvcc`'s grandparent, which is wrong when nvcc is a
    wrapper script in /usr/local/bin."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in filter(None, candidates):
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and \
                os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


mode = os.environ.get("HVAE_FAST_CUDA", "auto").lower()
if mode not in ("auto", "1", "0"):
    fail(f"HVAE_FAST_CUDA must be auto, 1 or 0, got {mode!r}")
cuda_home = find_cuda_home()
if mode == "1":
    if cuda_home is None:
        fail("HVAE_FAST_CUDA=1 but nvcc was not found: install the CUDA toolkit or set CUDA_HOME")
    if torch.version.cuda is None:
        fail(f"HVAE_FAST_CUDA=1 but torch {torch.__version__} is a CPU-only build: "
             "install a CUDA build of torch")
with_cuda = mode != "0" and cuda_home is not None and torch.version.cuda is not None
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cpu_simd():
    choice = os.environ.get("HVAE_FAST_CPU", "auto").lower()
    if choice not in ("auto", "avx2", "generic"):
        fail(f"HVAE_FAST_CPU must be auto, avx2 or generic, got {choice!r}")
    if choice == "auto":
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        choice = "avx2" if (" avx2" in flags and " fma" in flags) else "generic"
    return choice


debug = os.environ.get("DEBUG", "0") == "1"
simd = cpu_simd()
cxx = ["-O0", "-g"] if debug else ["-O3"]
if simd == "avx2":
    # ATen's own AVX2 kernels are built this way; Sleef's exp/log come from libtorch_cpu.
    cxx += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
link = []
openmp = torch.backends.openmp.is_available() and sys.platform.startswith("linux")
if openmp:
    # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs
    # on one thread. The module then needs libgomp.so.1, the one torch has loaded.
    cxx.append("-fopenmp")
    link.append("-fopenmp")
sanitize = os.environ.get("HVAE_FAST_SANITIZE", "0") == "1"
if sanitize:
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    cxx += san
    link += san
torch_major_minor = tuple(int(v) for v in torch.__version__.split(".")[:2])
std = "-std=c++20" if torch_major_minor >= (2, 14) else "-std=c++17"
cxx.append(std)

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
extra = {"cxx": cxx}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # ATen's CUDA headers need cuBLAS/cuSPARSE headers, shipped in torch's nvidia wheels.
    for site in sys.path:
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [std, "--expt-relaxed-constexpr", "--extended-lambda"]
    Extension = CUDAExtension
else:
    Extension = CppExtension


def build_info():
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda and not arch:
        from torch.utils.cpp_extension import _get_cuda_arch_flags
        arch = " ".join(f for f in _get_cuda_arch_flags() if "arch" in f)
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_kernels": with_cuda,
        "cuda_arch": arch if with_cuda else None,
        "cpu_simd": simd,
        "openmp": openmp,
        "debug": debug,
        "sanitize": sanitize,
    }


class Build(BuildExtension):
    """Writes _build_info.json next to the compiled module."""

    def run(self):
        super().run()
        target = os.path.dirname(self.get_ext_fullpath("hvae_fast._C"))
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "_build_info.json"), "w") as f:
            json.dump(build_info(), f, indent=1)


setup(
    ext_modules=[Extension("hvae_fast._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                           extra_link_args=link)],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
