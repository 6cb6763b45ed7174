"""prepare_model on tiny random Llama, Qwen2, Mistral, Gemma, Phi-3 (fused qkv / gate_up) and
GPT-2 (Conv1D): what gets quantized, frozen, kept in fp32, adapted; the report; errors."""
import pytest
import torch
from tiny_models import ARCHS, dequantized_twin, tiny_model
from torch import nn

import qlora
from qlora import Linear4bit, LoraConfig, LoraLinear

EXPECTED_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
}


def checkpointing(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return getattr(model, name)


def linear_names(model):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head"}


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_every_architecture(arch):
    model = tiny_model(arch)
    dense_linears = linear_names(model)
    emb_before = model.get_input_embeddings().weight
    prepared = qlora.prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    assert prepared is model
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert set(adapted) == dense_linears, "all-linear = every Linear/Conv1D but the output head"
    assert {n.rpartition(".")[2] for n in adapted} == EXPECTED_TARGETS[arch]
    assert all(isinstance(m.base_layer, Linear4bit) for m in adapted.values())
    assert all(m.base_layer.quant_type == "nf4" and m.base_layer.double_quant for m in adapted.values())
    # embeddings and lm_head: untouched (same tensor, bf16), frozen
    emb = model.get_input_embeddings().weight
    assert emb is emb_before and emb.dtype == torch.bfloat16 and not emb.requires_grad
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Linear) and head.weight.dtype == torch.bfloat16 and not head.weight.requires_grad
    # norms in fp32, everything but LoRA frozen
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # gradient checkpointing on, non-reentrant; no generation cache
    assert checkpointing(model) and model.config.use_cache is False
    # a training step: finite loss in the model's dtype, gradients reach every adapter
    model.train()
    ids = torch.randint(3, 256, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for n, m in adapted.items():
        assert m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0, n
        assert m.lora_A.weight.grad is not None, n


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_adapter_model_computes_the_dequantized_base(arch):
    """B = 0: the prepared model is exactly its base with decoded weights (fp32 compute)."""
    model = tiny_model(arch, torch.float32)
    qlora.prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32,
                        verbose=False)
    dense = dequantized_twin(model, arch, torch.float32)
    model.eval()
    ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_style_norms_run_fused_with_the_formulas_bits(arch, monkeypatch):
    """Llama, Qwen2, Mistral and Phi-3 norms become qlora's RMSNorm (one fused kernel); Gemma's
    (1 + w) and GPT-2's LayerNorm keep their own forward behind the fp32 hooks. The logits and
    the loss are bit for bit those of the op-by-op formula (nn/rms_norm.py: rms_norm_ref)."""
    from qlora.nn.rms_norm import RMSNorm, rms_norm_ref
    model = tiny_model(arch)
    qlora.prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    fused = [m for m in model.modules() if isinstance(m, RMSNorm)]
    hooked = [m for m in model.modules() if getattr(m, "_qlora_fp32_hooks", False)]
    if arch in ("gemma", "gpt2"):
        assert not fused and hooked
    else:
        assert fused and not hooked and all(m.weight.dtype == torch.float32 for m in fused)
    ids = torch.randint(3, 256, (2, 12))
    model.eval()  # GPT-2's own dropouts off: two calls compute the same
    out = model(ids, labels=ids)
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: rms_norm_ref(x, self.weight, self.eps))
    ref = model(ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_form_rotary_runs_fused_with_transformers_values(arch):
    """Llama, Qwen2, Mistral and Gemma attention call qlora's fused rotary (nn/rotary.py), through
    each module's own hook; Phi-3's partial rotary and GPT-2 (none) keep theirs. The loss and
    every LoRA gradient are bit for bit those of transformers' own rotary (the hooks taken out)."""
    from qlora.nn import rotary
    model = tiny_model(arch, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # GPT-2's own dropouts off
    qlora.prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    hooks = [m._kernel_funcs[rotary.HOOK] for m in model.modules()
             if rotary.HOOK in m.__dict__.get("_kernel_funcs", {})]
    fused = [h for h in hooks if "forward" in h.__dict__]
    assert len(fused) == (0 if arch in ("phi3", "gpt2") else 2)
    ids = torch.randint(3, 256, (2, 12))
    model.train()

    def loss_and_grads():
        loss = model(ids, labels=ids).loss
        loss.backward()  # (reentrant checkpointing: no autograd.grad)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return [loss.detach(), *grads]

    ours = loss_and_grads()
    for h in fused:
        del h.forward
    theirs = loss_and_grads()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_report_counts_each_part():
    model = tiny_model("llama")
    n_embed = model.get_input_embeddings().weight.numel()
    lin = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    qlora.prepare_model(model, lora=LoraConfig(r=8, alpha=16), verbose=False)
    rep = model.qlora_report
    lora_params = sum(8 * (o + i) for o, i in lin.values())
    assert rep.trainable == lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(o * i for o, i in lin.values())
    assert rep.parts["4-bit weights"] == (quantized, quantized // 2)
    assert rep.parts["embeddings"] == (n_embed, 2 * n_embed)
    assert rep.parts["LoRA"] == (lora_params, 4 * lora_params)
    assert rep.parts["norms"][1] == 4 * rep.parts["norms"][0]
    assert "dense linear" not in rep.parts
    text = str(rep)
    assert "trainable parameters" in text and "4-bit weights" in text


def test_report_is_printed(capsys):
    qlora.prepare_model(tiny_model("qwen2"))
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "LoRA" in out


def test_target_lists_and_regex_choose_adapters_all_linears_still_quantized():
    model = tiny_model("llama")
    qlora.prepare_model(model, lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    adapted = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == {"q_proj", "v_proj"}
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14  # 7 per layer x 2 layers

    model = tiny_model("llama")
    qlora.prepare_model(model, lora=LoraConfig(r=4, target_modules=r".*\.0\.mlp\..*_proj"), verbose=False)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert adapted == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_16bit_lora_baseline_and_no_lora():
    model = tiny_model("llama")
    qlora.prepare_model(model, lora=LoraConfig(r=4), quant_type=None, verbose=False)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    bases = [m.base_layer for m in model.modules() if isinstance(m, LoraLinear)]
    assert bases and all(isinstance(b, nn.Linear) and b.weight.dtype == torch.bfloat16 for b in bases)
    assert model.qlora_report.parts["dense linear"][0] == sum(b.weight.numel() for b in bases)

    model = tiny_model("llama")
    qlora.prepare_model(model, lora=None, verbose=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14


def test_options_reach_the_layers():
    model = tiny_model("gpt2")
    qlora.prepare_model(model, lora=LoraConfig(r=2, alpha=4, dtype=torch.bfloat16, use_rslora=True),
                        quant_type="fp4", double_quant=False, compute_dtype=torch.float16,
                        gradient_checkpointing=False, verbose=False)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.base_layer.quant_type == "fp4" and not layer.base_layer.double_quant
    assert layer.base_layer.compute_dtype == torch.float16 and layer.lora_A.weight.dtype == torch.bfloat16
    assert layer.scaling == pytest.approx(4 / 2**0.5)
    assert not checkpointing(model)


def test_bad_arguments_name_what_is_wrong():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer of LlamaForCausalLM"):
        qlora.prepare_model(model, lora=LoraConfig(target_modules=["q_proj", "nope"]), verbose=False)
    with pytest.raises(ValueError, match="selects no linear layer"):
        qlora.prepare_model(model, lora=LoraConfig(target_modules=r"xyz.*"), verbose=False)
    with pytest.raises(ValueError, match="valid regex"):
        qlora.prepare_model(model, lora=LoraConfig(target_modules="(["), verbose=False)
    assert not any(isinstance(m, Linear4bit) for m in model.modules()), "a failed call changes nothing"
    with pytest.raises(TypeError, match="LoraConfig"):
        qlora.prepare_model(model, lora={"r": 8}, verbose=False)
    with pytest.raises(TypeError, match="nn.Module"):
        qlora.prepare_model("meta-llama/Llama-2-7b")
    qlora.prepare_model(model, verbose=False)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        qlora.prepare_model(model, verbose=False)


def test_checkpoint_every_n_layers_recomputes_only_those():
    model = tiny_model("llama", torch.float32, num_hidden_layers=4)
    model = qlora.prepare_model(model, lora=LoraConfig(r=4), compute_dtype=torch.float32, checkpoint_every=2,
                                verbose=False)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    with pytest.raises(ValueError, match="checkpoint_every"):
        qlora.prepare_model(tiny_model("llama"), checkpoint_every=0, verbose=False)


def _dropping(arch: str, **kwargs):
    """A prepared fp32 model in training mode, LoRA dropout 0.2, B not zero (something to differentiate)."""
    model = qlora.prepare_model(tiny_model(arch, torch.float32), lora=LoraConfig(r=4, alpha=8, dropout=0.2),
                                compute_dtype=torch.float32, verbose=False, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.train()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing_and_keep_attention_skips_attention(arch):
    """With seeded LoRA dropout the recomputed forward draws the same masks, so checkpointed
    gradients equal those of a run without checkpointing (and reentrant checkpointing, the
    default, the non-reentrant form's bit for bit); with keep_attention the recompute skips the
    attention kernel, whose outputs were kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora.model.prepare import ATTENTION_OPS

    class CountAttention(TorchDispatchMode):  # sees an op only when no checkpoint cache answered it
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAttention.calls += func in ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    grads, calls = {}, {}
    for ckpt in ("none", "full", "full-nonreentrant", "keep_attention"):
        torch.manual_seed(0)
        model = _dropping(arch, gradient_checkpointing=ckpt != "none", keep_attention=ckpt == "keep_attention")
        if ckpt.startswith("full"):  # prepare_model checkpoints reentrantly (fewer host hooks) ...
            assert model.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is True
        if ckpt == "full-nonreentrant":  # ... with the non-reentrant form's gradients, bit for bit
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)  # the dropout seeds
        CountAttention.calls = 0
        with CountAttention():
            model(input_ids=ids, labels=ids).loss.backward()
        calls[ckpt] = CountAttention.calls
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    assert calls == {"none": layers, "full": 2 * layers, "full-nonreentrant": 2 * layers, "keep_attention": layers}, calls
    for n, g in grads["full-nonreentrant"].items():
        assert torch.equal(grads["full"][n], g), n
    for ckpt in ("full", "keep_attention"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[ckpt][n], g, rtol=1e-5, atol=1e-7)



def test_each_decoder_layer_draws_its_dropout_seeds_once_and_two_forwards_before_backward_stay_exact():
    """share_seeds: one SeedBank per decoder layer, so a training forward draws one seed tensor
    per layer, not one per adapter; two checkpointed forwards before one backward (each layer's
    recomputation replays its own pass) give the gradients of no checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountDraws(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountDraws.calls += func.overloadpacket is torch.ops.aten.randint
            return func(*args, **(kwargs or {}))

    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _dropping("llama", gradient_checkpointing=ckpt)
        slots = [[m.seed_slot for m in layer.modules() if isinstance(m, LoraLinear)] for layer in model.model.layers]
        assert all(len({id(bank) for bank, _ in s}) == 1 and [i for _, i in s] == list(range(7)) for s in slots)
        assert len({id(s[0][0]) for s in slots}) == len(slots)
        ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        CountDraws.calls = 0
        with CountDraws():
            first = model(input_ids=ids, labels=ids).loss
        assert CountDraws.calls == model.config.num_hidden_layers
        second = model(input_ids=ids.flip(0), labels=ids.flip(0)).loss
        (first + 2 * second).backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7)
