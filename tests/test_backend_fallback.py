"""Without the compiled extension the package still imports and runs, on the PyTorch reference
path, with exactly one warning that says why. Run in a subprocess that blocks the extension's
import, so this test holds whether or not the extension is built here."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "falconnet_kernels._C":
                raise ImportError("simulated: the extension was not built")

    sys.meta_path.insert(0, BlockExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import falconnet
        import falconnet_kernels
        from falconnet_kernels import reference as ref
    why = [str(w.message) for w in caught if "extension is not built" in str(w.message)]
    assert len(why) == 1, why
    assert "simulated: the extension was not built" in why[0], why[0]
    info = falconnet_kernels.kernels_info()
    assert info["extension_built"] is False and info["active"]["sf_conv"]["cpu"] == "torch", info
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    w1, w2 = torch.randn(4, 8, 8, dtype=torch.float64), torch.randn(8, 16, 4, dtype=torch.float64)
    assert torch.allclose(falconnet_kernels.sf_conv(x, w1, w2), ref.sf_conv_ref(x, w1, w2))
    model = falconnet.create_model("falconnet", num_classes=10).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    print("ok")
    """
)


def test_imports_and_runs_without_the_extension():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
