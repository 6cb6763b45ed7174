"""Packed batches keep documents apart: the loss and LoRA gradients of a packed batch equal
those of the same documents run one by one, on every architecture packing is on for."""
from types import SimpleNamespace

import pytest
import torch

from qlora import LoraConfig, prepare_model
from qlora.model.attention import set_attention
from qlora.model.loss import IGNORE, _as_forward, _fused_loss, causal_lm_loss, fusable
from qlora.model.packing import PACKED_MODEL_TYPES, model_inputs, packs_exactly
from qlora.train import data as D
from qlora.train.distributed import Ranks, share

from tiny_models import ARCHS, tiny_model

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def _documents(seed: int = 0, lengths=(9, 23, 5, 17, 30, 12, 7)) -> list[D.Example]:
    """Documents of random tokens, the first third of each a prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        docs.append(D.Example(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return docs


def _model(arch: str, dtype: torch.dtype, checkpointing: bool = True, **overrides):
    model = prepare_model(tiny_model(arch, dtype, **NO_DROPOUT.get(arch, {}), **overrides),
                          lora=LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=dtype,
                          gradient_checkpointing=checkpointing, verbose=False)
    with torch.no_grad():  # B starts at zero: give the adapters something to differentiate
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def _grads(model, loss) -> dict[str, torch.Tensor]:
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _one_by_one(model, docs: list[D.Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean token loss over all documents, and its gradients, each document run alone."""
    counts = [sum(label != IGNORE for label in d.labels[1:]) for d in docs]
    loss, grads = torch.zeros(()), {}
    for d, n in zip(docs, counts):
        part = causal_lm_loss(model, D.collate([d], pad=0)).float() * (n / sum(counts))
        loss += part.detach()
        for k, g in _grads(model, part).items():
            grads[k] = grads.get(k, 0) + g
    return loss, grads


def _packed(model, docs: list[D.Example], max_length: int = 40, multiple: int = 16):
    rows = D.pack(docs, max_length)
    assert len(rows) < len(docs) and any(len(r.lengths) > 1 for r in rows)  # something was packed
    batch = D.collate(rows, pad=0, multiple=multiple)  # padded at the end of the shorter rows, too
    loss = causal_lm_loss(model, batch)
    return loss.detach().float(), _grads(model, loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batch_equals_documents_one_by_one_fp32(arch):
    model = _model(arch, torch.float32)
    assert fusable(model) and packs_exactly(model)
    docs = _documents()
    ref_loss, ref_grads = _one_by_one(model, docs)
    loss, grads = _packed(model, docs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_batch_equals_documents_one_by_one_bf16(arch):
    """In bf16 the sums run in another order, so the gradients differ by bf16 rounding: no
    more than the padded batch of the same documents differs (about 1% here), and far less
    than attention and positions running across the documents would cost."""
    model = _model(arch, torch.bfloat16)
    docs = _documents(seed=2)
    ref_loss, ref_grads = _one_by_one(model, docs)

    def gap(grads):
        return max(float((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()) for k in ref_grads)

    loss, grads = _packed(model, docs)
    padded_grads = _grads(model, causal_lm_loss(model, D.collate(docs, pad=0, multiple=16)))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    assert gap(grads) <= 1.5 * gap(padded_grads) + 1e-3, (gap(grads), gap(padded_grads))
    mixed = {k: v for k, v in D.collate(D.pack(docs, 40), pad=0, multiple=16).items() if k != "position_ids"}
    assert gap(_grads(model, causal_lm_loss(model, mixed))) > 0.5  # documents not kept apart


def test_eager_attention_keeps_documents_apart_too():
    model = _model("llama", torch.float32)
    set_attention(model, "eager")  # --attn-implementation eager
    assert model.config._attn_implementation == "eager" and packs_exactly(model)
    docs = _documents(seed=5)
    ref_loss, ref_grads = _one_by_one(model, docs)
    loss, grads = _packed(model, docs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sliding_window_attention_stays_inside_each_document():
    """Mistral with a window shorter than the documents: the window and the boundaries both hold."""
    model = _model("mistral", torch.float32, sliding_window=6)
    docs = _documents(seed=3)
    ref_loss, ref_grads = _one_by_one(model, docs)
    loss, grads = _packed(model, docs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_unfused_and_wrapped_paths_pass_the_position_ids():
    """The model's own loss (a head that cannot be fused) and the forward swapped in under
    DDP / FSDP2 get the position ids too."""
    model = _model("llama", torch.float32, checkpointing=False)
    docs = _documents(seed=4)
    batch = D.collate(D.pack(docs, 40), pad=0)
    fused = causal_lm_loss(model, batch)
    with _as_forward(model, lambda m, b: _fused_loss(m, b, None)):
        swapped = model(**batch)
    torch.testing.assert_close(swapped, fused)
    model.config.final_logit_softcapping = 30.0  # llama ignores it; fusable() falls back to model(...).loss
    assert not fusable(model)
    torch.testing.assert_close(causal_lm_loss(model, batch), fused, rtol=1e-5, atol=1e-6)
    ref_loss, _ = _one_by_one(model, docs)
    torch.testing.assert_close(fused.detach(), ref_loss, rtol=1e-5, atol=1e-6)


def test_model_inputs_and_which_models_pack():
    batch = D.collate([D.Example([5, 6, 7], [5, 6, 7], (2, 1))], pad=0, multiple=4)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0]]
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs and inputs["use_cache"] is False  # both would hide the boundaries
    padded = D.collate([D.Example([5, 6], [5, 6]), D.Example([7], [7])], pad=0)
    assert model_inputs(padded)["attention_mask"].tolist() == [[1, 1], [1, 0]]
    unpadded = D.collate([D.Example([5, 6], [5, 6])], pad=0)
    assert "attention_mask" not in model_inputs(unpadded) and "attention_mask" not in share(unpadded, Ranks())
    assert all(packs_exactly({"model_type": t}) for t in PACKED_MODEL_TYPES)
    assert not packs_exactly({"model_type": "gemma2"}) and not packs_exactly({"model_type": "mamba"})
    model = tiny_model("llama")
    model.config._attn_implementation = "paged|sdpa"  # an implementation that takes no mask
    assert not packs_exactly(model)


def test_the_prebuilt_mask_is_transformers_own():
    """model_inputs' mask for a padded and a packed batch is the one transformers builds from the
    2-D mask or the position ids, with a sliding window too; layers of two kinds, eager or
    another architecture leave it to transformers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    model = tiny_model("mistral", sliding_window=None)
    docs = _documents(seed=7)
    for batch in (D.collate(docs, pad=0), D.collate(D.pack(docs, 40), pad=0)):
        inputs = model_inputs(batch, model.config)
        embeds = torch.zeros(*batch["input_ids"].shape, 8)
        ours = inputs["attention_mask"]
        theirs = create_causal_mask(model.config, embeds, batch["attention_mask"] if "position_ids" not in batch
                                    else None, None, position_ids=batch.get("position_ids"))
        assert ours.dtype == torch.bool and torch.equal(ours.expand_as(theirs), theirs)
    for size in (5, batch["input_ids"].shape[1]):
        model.config.sliding_window = size
        theirs = create_sliding_window_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"])
        assert torch.equal(model_inputs(batch, model.config)["attention_mask"].expand_as(theirs), theirs)
    qwen2 = tiny_model("qwen2", use_sliding_window=True, sliding_window=5,
                       layer_types=["full_attention", "sliding_attention"]).config
    assert len(set(qwen2.layer_types)) == 2 and "attention_mask" not in model_inputs(batch, qwen2)  # two masks
    model.config._attn_implementation = "eager"
    assert "attention_mask" not in model_inputs(batch, model.config)
    assert "attention_mask" not in model_inputs(batch, SimpleNamespace(model_type="gemma2", _attn_implementation="sdpa"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_step_reads_nothing_back_from_the_device(arch, host_reads):
    """The forward and backward of a padded and a packed batch, as the trainer hands them over
    (share), read no value back (each read is a device sync on a GPU), and give the loss of
    transformers' own masks; the model left to build the padded mask reads one. (A batch with
    no padding still reads one: transformers scans the default position ids for documents.)"""
    model = _model(arch, torch.float32)
    docs = _documents(seed=6)
    padded = D.collate(docs, pad=0)
    for batch in (padded, D.collate(D.pack(docs, 40), pad=0)):
        shared = share(batch, Ranks())
        with host_reads() as reads:
            loss = causal_lm_loss(model, shared)
            loss.backward()
        assert reads.seen == [], reads.seen
        packed = "position_ids" in batch  # transformers reads the documents from the position ids alone
        theirs = model(**{k: v for k, v in batch.items() if not (packed and k == "attention_mask")}, use_cache=False)
        torch.testing.assert_close(loss, theirs.loss, rtol=1e-5, atol=1e-6)
    with host_reads() as reads:
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)
    assert reads.seen  # transformers' own mask code asks whether there is padding
