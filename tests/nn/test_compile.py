"""torch.compile over qlora layers: the custom ops (qlora/nn/ops.py) pass torch.library's checks,
a prepared decoder layer (4-bit base, LoRA with dropout) traces as one graph with no break,
and compiled training (compile_layers, with checkpointing) computes what eager does. The
aot_eager backend runs the traced graphs op by op, so results compare bit for bit."""
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo

import qlora
from qlora.model.prepare import compile_layers
from qlora.nn import ops

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from tiny_models import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    qt = qlora.quantize(torch.randn(32, 128), "nf4", 64, True)
    offset = torch.tensor(float(qt.nested_offset))
    args = (qt.data, qt.absmax, qt.code, qt.nested_absmax, qt.nested_code, offset, 64, [32, 128], torch.bfloat16)
    torch.library.opcheck(ops.decode_4bit, args)
    assert torch.equal(ops.decode(qt, offset, torch.bfloat16), qt.dequantize(torch.bfloat16))
    x = torch.randn(8, 100)
    torch.library.opcheck(ops.seeded_dropout, (x, 0.1, torch.tensor(123), 0.5))


def _prepared(checkpointing: bool, arch: str = "llama"):
    torch.manual_seed(0)
    model = qlora.prepare_model(tiny_model(arch, torch.bfloat16), lora=qlora.LoraConfig(r=8, alpha=16, dropout=0.1),
                                compute_dtype=torch.bfloat16, gradient_checkpointing=checkpointing, verbose=False)
    for m in model.modules():
        if isinstance(m, qlora.LoraLinear):
            torch.nn.init.normal_(m.lora_B.weight, 0, 0.3)  # trained adapters: the update and dropout matter
    return model.train()


def test_a_decoder_layer_is_one_graph():
    model = _prepared(checkpointing=False)
    layer = model.model.layers[0]
    x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    emb = model.model.rotary_emb(x, torch.arange(16)[None].expand(2, -1))
    explained = torch._dynamo.explain(layer)(x, position_embeddings=emb)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    names = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("Lora4bitLinear" in n or "autograd_function_apply" in n for n in names), names  # the one-Function path


def test_a_decoder_layer_with_varlen_attention_is_one_graph(monkeypatch):
    """--attn-implementation varlen through torch's own varlen op (its fake implementation
    traces; tests/model/varlen_cpu.py runs it on the CPU): still one graph, no break."""
    import varlen_cpu

    from qlora.model import varlen
    from qlora.model.attention import set_attention

    varlen_cpu.install()
    monkeypatch.setattr(varlen, "_kernel", lambda query: varlen.torch_varlen)
    model = _prepared(checkpointing=False)
    set_attention(model, "varlen", "cuda")  # the device check wants CUDA; the CPU kernels run here
    layer = model.model.layers[0]
    x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2)
    cu, longest = varlen.cu_seq_lens(pos)
    explained = torch._dynamo.explain(layer)(
        x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=varlen.placeholder_mask(x.device),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    names = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("varlen" in n for n in names), names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_training_step_equals_eager(arch):
    """Bit for bit, LoRA dropout on. GPT-2's own dropout layers (torch's, in the model) are
    turned off: their masks are drawn differently inside a compiled graph than eager. LoRA's
    seeds: eager draws a decoder layer's seven as one randint of seven (nn/dropout.py SeedBank),
    compiled as seven randints of one; the CPU generator gives the same values in the same order."""
    model = _prepared(checkpointing=True, arch=arch)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and not name.endswith("lora_dropout"):
            m.p = 0.0
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout seeds
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager = step()
    breaks = torch._dynamo.utils.counters["graph_break"]
    breaks.clear()
    assert compile_layers(model, backend="aot_eager") == model.config.num_hidden_layers
    compiled = step()
    assert not breaks, dict(breaks)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really were compiled
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_compile_layers_needs_decoder_layers():
    with pytest.raises(ValueError, match="no transformers decoder layers"):
        compile_layers(torch.nn.Linear(2, 2))
