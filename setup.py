"""Build and install falconnet (models, training) and falconnet_kernels (the fused ops).

The C++ CPU ops are always built. The CUDA sources (csrc/cuda/*.cu) are built when a GPU is
visible to torch and nvcc is found, or when FORCE_CUDA=1 (compiles without a GPU, as CI does).
FALCONNET_SKIP_CUDA_BUILD=1 skips them. TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0").
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_header_dir() -> str | None:
    """Torch's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers, which a bare CUDA
    toolkit may lack; the nvidia-* wheels that torch depends on ship them.

    Rather than putting the wheels' include folders ahead of the toolkit's (their cuda_runtime.h
    may be another minor version), link only the headers the toolkit lacks into a folder of our
    own, so that nothing of the toolkit is shadowed.
    """
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    toolkit_include = os.path.join(CUDA_HOME or "", "include")
    if CUDA_HOME and os.path.exists(os.path.join(toolkit_include, "cublas_v2.h")):
        return None
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return None
    found = {}
    for base in list(nvidia.__path__):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            for path in glob.glob(os.path.join(inc, "*.h")):
                name = os.path.basename(path)
                if not os.path.exists(os.path.join(toolkit_include, name)):
                    found.setdefault(name, path)
    if "cublas_v2.h" not in found:
        return None
    out = os.path.join(ROOT, "build", "nvidia_headers")
    os.makedirs(out, exist_ok=True)
    for name, path in found.items():
        link = os.path.join(out, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(path, link)
    return out


def _locate_cuda_home() -> None:
    """Point torch at the real toolkit when `nvcc` on PATH is a wrapper script (as on this
    project's machines), since torch would otherwise guess CUDA_HOME from the wrapper's folder."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


def _extensions():
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        not _flag("FALCONNET_SKIP_CUDA_BUILD")
        and bool(cuda_sources)
        and CUDA_HOME is not None
        and (_flag("FORCE_CUDA") or torch.cuda.is_available())
    )
    # -g0: Python's default CFLAGS carry -g, whose debug info for torch's headers was half of each
    # C++ file's compile time (bn_act.cpp 54 s -> 24 s on 2026-11-27's 2-core CI-like machine)
    cxx = ["-O3", "-g0", "-fopenmp"]
    if not _flag("FALCONNET_PORTABLE"):
        cxx.append("-march=native")  # the package is built where it runs; set FALCONNET_PORTABLE=1 for wheels
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        print("falconnet: building the C++ CPU ops only", file=sys.stderr)
        return [
            CppExtension(
                "falconnet_kernels._C",
                cpp_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extra = _nvidia_wheel_header_dir()
    if extra:
        include_dirs.append(extra)
    print(f"falconnet: building the C++ CPU ops and the CUDA ops for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return [
        CUDAExtension(
            "falconnet_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("FALCONNET_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="falconnet",
    version="0.1.0",
    description="FalconNet (LightNet, RepSO, SF-Conv, RefCO) in PyTorch with fused CPU, CUDA and Triton kernels",
    packages=find_packages(include=["falconnet", "falconnet.*", "falconnet_kernels", "falconnet_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"train": ["tqdm", "matplotlib", "scikit-learn"], "triton": ["triton>=3.0"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    entry_points={"console_scripts": ["falconnet=falconnet.cli:main"]},
    zip_safe=False,
)
