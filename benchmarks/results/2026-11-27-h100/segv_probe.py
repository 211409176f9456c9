"""Which TORCH_CHECK messages crash (SIGSEGV) instead of raising, in code compiled by nvcc and by
g++ against the installed torch? On the H100 (torch 2.11, 2026-11-26/27) the CUDA ops' checks
that stream an int64 or a std::string crashed while those streaming only literals and a
ScalarType raised. The same four checks are built twice (a .cu through nvcc, a .cpp through g++)
and each is called in its own process on a CPU tensor.
    python segv_probe.py            (prints one line per check and compiler)"""
import os
import subprocess
import sys
import tempfile

SRC = r'''
#include <torch/extension.h>
#include <string>
static std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}
void chk_literal(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "literal only"); }
void chk_dtype(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "dtype ", t.scalar_type()); }
void chk_int(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "int ", t.dim()); }
void chk_str(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "str ", shape_str(t.sizes())); }
void chk_sizes(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "sizes ", t.sizes()); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chk_literal", &chk_literal); m.def("chk_dtype", &chk_dtype); m.def("chk_int", &chk_int);
  m.def("chk_str", &chk_str); m.def("chk_sizes", &chk_sizes);
}
'''
CHECKS = ("chk_literal", "chk_dtype", "chk_int", "chk_str", "chk_sizes")


def main():
    import torch
    from torch.utils.cpp_extension import load

    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI, flush=True)
    for tool in (["g++", "--version"], ["nvcc", "--version"]):
        try:
            print(subprocess.run(tool, capture_output=True, text=True).stdout.strip().splitlines()[-1 if tool[0] == "nvcc" else 0])
        except OSError as e:
            print(tool[0], e)
    d = tempfile.mkdtemp()
    built = {}
    for ext in ("cu", "cpp"):
        path = os.path.join(d, f"probe_{ext}.{ext}")
        with open(path, "w") as f:
            f.write(SRC)
        try:
            inc = [os.environ["PROBE_INCLUDE"]] if os.environ.get("PROBE_INCLUDE") else []  # cuBLAS headers, if apart
            load(f"probe_{ext}", [path], build_directory=d, extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                 extra_include_paths=inc)
            built[ext] = True
        except Exception as e:  # noqa: BLE001 - report and go on
            print(ext, "build failed:", "\n".join(str(e).splitlines()[-15:]))
    procs = {}
    for ext in built:
        for chk in CHECKS:
            code = (f"import sys, torch; sys.path.insert(0, {d!r}); import probe_{ext} as m\n"
                    f"try:\n    m.{chk}(torch.zeros(2, 3))\nexcept RuntimeError as e:\n    print('raised:', str(e).splitlines()[0])")
            procs[ext, chk] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for (ext, chk), p in procs.items():
        out, _ = p.communicate()
        print(f"{ext:4s} {chk:12s} exit {p.returncode:4d}  {out.strip().splitlines()[-1] if out.strip() else ''}")


if __name__ == "__main__":
    main()
