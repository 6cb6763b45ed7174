"""causal_lm_loss (fused head + cross-entropy, chunked, gradient in forward) against
transformers' own `model(**batch).loss`: the same loss and the same LoRA gradients."""
import pytest
import torch

from qlora import LoraConfig, prepare_model
from qlora.model.loss import causal_lm_loss, fusable, head_cross_entropy

from tiny_models import ARCHS, tiny_model


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # prompt tokens
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(arch: str = "llama"):
    """A prepared fp32 model whose adapters are not zero (B starts at zero: something to differentiate)."""
    model = prepare_model(tiny_model(arch, torch.float32), lora=LoraConfig(r=4, alpha=8, dropout=0.0),
                          compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _grads(model, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformers_loss_and_lora_grads(arch):
    model = _model(arch)
    assert fusable(model)
    batch = _batch()
    ref = model(**batch).loss
    ref_grads = _grads(model, ref)
    got = causal_lm_loss(model, batch, chunk_tokens=7)  # several chunks, the last one short
    got_grads = _grads(model, got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == got_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_head_cross_entropy_against_dense_math_bf16():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 50, bias=True).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50, (9,))
    loss = head_cross_entropy(h, head, y, chunk_tokens=4)
    (loss * 3).backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(head(h2).float(), y)
    (ref * 3).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=2e-2, atol=1e-4)


def test_no_targets_gives_zero_loss_and_gradient():
    head = torch.nn.Linear(8, 10).requires_grad_(False)
    h = torch.randn(4, 8, requires_grad=True)
    loss = head_cross_entropy(h[:0], head, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(h.grad) == 0


def test_trainable_or_capped_heads_fall_back_to_the_model():
    model = tiny_model("llama", torch.float32)
    model.lm_head.requires_grad_(True)
    assert not fusable(model)
    model.lm_head.requires_grad_(False)
    assert fusable(model)
    model.config.final_logit_softcapping = 30.0
    assert not fusable(model)
    batch = _batch()
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss)


def test_ddp_and_fsdp2_models_compute_the_fused_loss_inside_their_forward():
    """Under torchrun the trainer's model is DDP-wrapped or FSDP2-sharded: the fused loss runs in
    the model's own forward (the wrappers' hooks around it), gives the plain model's loss and
    LoRA gradients, and never calls the head on all positions. One gloo rank here."""
    import copy
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from qlora.model.shard import transformer_blocks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model()
        batch = _batch()
        ref = causal_lm_loss(model, batch)
        ref_grads = _grads(model, ref)
        sharded = copy.deepcopy(model)
        for block in transformer_blocks(sharded):
            fully_shard(block)
        fully_shard(sharded)
        wrapped = {"ddp": DistributedDataParallel(copy.deepcopy(model)), "fsdp2": sharded}
        for name, m in wrapped.items():
            inner = m.module if name == "ddp" else m
            own_forward = None
            if name == "ddp":  # an instance-level forward (as accelerate's hooks set one) must survive
                own_forward = inner.forward
                inner.forward = own_forward
            head_calls = []
            inner.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
            loss = causal_lm_loss(m, batch)
            grads = {n.removeprefix("module."): g.full_tensor() if hasattr(g, "full_tensor") else g
                     for n, g in _grads(m, loss).items()}
            assert head_calls == [], name  # the fused head: F.linear on labelled rows, chunk by chunk
            assert vars(inner).get("forward") is own_forward, name  # the model's own forward is back
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
            assert grads.keys() == ref_grads.keys(), name
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_token_log_probs_match_dense_log_softmax_and_gradients():
    from qlora.model.loss import token_log_probs

    model = _model()
    batch = _batch()
    keep = batch["labels"][:, 1:] != -100
    weights = torch.randn(int(keep.sum()))  # a downstream loss weighs each token differently
    got = token_log_probs(model, batch, keep, chunk_tokens=5)
    got_grads = _grads(model, (got * weights).sum())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ref = logits.float().log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)[keep]
    ref_grads = _grads(model, (ref * weights).sum())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_target_index_from_the_host_picks_the_mask_rows_without_a_device_sync():
    """distributed.share builds target_index on the host: the loss then selects by index (no
    nonzero, no boolean-mask index: on a GPU each of those waits for the device), with the
    boolean mask's loss and gradients bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora.model.loss import target_index
    from qlora.train.distributed import Ranks, share

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
            self.n += name in ("nonzero", "masked_select") or bool_index
            return func(*args, **(kwargs or {}))

    batch = _batch()
    keep = batch["labels"][:, 1:] != -100
    index = target_index(batch["labels"])
    rows, cols = index // 17, index % 17
    assert torch.equal(keep[rows, cols], torch.ones_like(rows, dtype=torch.bool)) and len(index) == keep.sum()
    assert torch.equal(index, index.sort().values)  # row-major, as the mask's order
    model = _model()
    shared = share(batch, Ranks())
    assert torch.equal(shared["target_index"], index)
    with Syncs() as syncs:
        loss = causal_lm_loss(model, shared)
    assert syncs.n == 0
    with Syncs() as syncs:  # without it the loss finds the targets itself (a sync where labels are on a GPU)
        ref = causal_lm_loss(model, batch)
    assert syncs.n > 0
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, loss).values(), _grads(model, ref).values()))
