"""The deployed FalconNet runs on the fused ops end to end; torch.compile(fullgraph=True) and
torch.export take the whole model (a graph break would raise), and agree with eager mode."""
import torch

import falconnet


def _deployed():
    model = falconnet.create_model("falconnet", num_classes=10).eval()
    return falconnet.reparameterize_model(model)


def test_deployed_falconnet_compiles_fullgraph():
    model = _deployed()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    # same ops, same order: only float32 rounding of the traced graph can differ
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_deployed_falconnet_exports_with_the_custom_ops():
    model = _deployed()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("falconnet.sf_conv" in t for t in targets), targets
    assert any("falconnet.dw_conv3x3" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
