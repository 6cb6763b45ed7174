"""Preference tuning (qlora/train/preference.py): DPO and ORPO against TRL's trainers on a fixed
batch (TRL, peft as test-only references), the rows, and the loop with --method dpo|orpo.

Stated tolerance: loss and LoRA gradients within 1e-4 relative of TRL's DPOTrainer (sigmoid,
ipo) and ORPOTrainer on the same base (qlora's NF4 weights decoded to float32 for TRL's peft
model), fp32 compute.
"""
import json

import pytest
import torch

from qlora import LoraConfig, LoraLinear, prepare_model
from qlora.rows import DataError
from qlora.train import TrainConfig, train
from qlora.train import preference as P
from qlora.train.config import ConfigError, validate
from qlora.train.report import read_metrics

from conftest import write_rows

ROWS = [{"prompt": f"Write a function that adds {i}.", "chosen": f"def f{i}(x):\n    return x + {i}\n",
         "rejected": f"def f{i}(x):\n    return x - {i}" + "  # wrong" * (i % 3) + "\n"} for i in range(40)]
FAST = dict(batch_size=2, grad_accum=2, lora_r=8, lr=1e-3, max_length=64, demo=False, compute_dtype="float32",
            lora_dropout=0.0)


@pytest.fixture()
def pairs_file(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", ROWS)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _qlora_model(model_dir, seed=1):
    """The tiny Llama as qlora trains it (NF4, fp32 compute), adapters randomized (policy != reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32,
                  gradient_checkpointing=False, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    return model


def _dense_twin(model, model_dir):
    """A transformers model with qlora's decoded base weights, and the peft LoRA config of its adapters."""
    import peft
    from transformers import AutoModelForCausalLM

    from qlora import Linear4bit

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {name.replace(".base_layer", "") + ".weight": m.weight.dequantize(torch.float32)
             for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not unexpected
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return dense, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _copy_adapters(model, peft_model):
    """qlora's adapter weights into the trainer's fresh peft adapter (TRL's reference: adapters off)."""
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(ours[_peft_key(name)])


def _grads(named):
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def _peft_key(name):  # base_model.model.X.lora_A.default.weight -> X.lora_A.weight
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def _pairs(model_dir):
    return P.tokenize_pairs([(f"rows:{i}", r) for i, r in enumerate(ROWS[:4])], _tokenizer(model_dir), 64)[0]


def _assert_same(ours, theirs, ours_grads, theirs_grads):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    theirs_grads = {_peft_key(k): v for k, v in theirs_grads.items()}
    assert sorted(ours_grads) == sorted(theirs_grads) and len(ours_grads) == 2 * 7 * 2
    for k in ours_grads:
        assert theirs_grads[k].abs().max() > 0, k
        torch.testing.assert_close(ours_grads[k], theirs_grads[k], rtol=1e-4, atol=1e-4 * theirs_grads[k].abs().max(),
                                   msg=k)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(model_dir, tmp_path, loss_type):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = _qlora_model(model_dir)
    dense, lora = _dense_twin(model, model_dir)
    pairs = _pairs(model_dir)
    tok = _tokenizer(model_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], report_to=[],
                         bf16=False, gradient_checkpointing=False, per_device_train_batch_size=4, max_length=None)
    trainer = trl.DPOTrainer(model=dense, args=args, processing_class=tok, peft_config=lora,
                             train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                              for r in ROWS[:4]]))
    _copy_adapters(model, trainer.model)
    their_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs])
    theirs = trainer.compute_loss(trainer.model, their_batch)
    theirs.backward()

    objective = P.Preference("dpo", beta=0.3, loss_type=loss_type)
    terms, stats = objective.sums(model, P.collate_pairs(pairs, tok.pad_token_id))
    ours = terms["pairs"] / len(pairs)
    ours.backward()
    _assert_same(ours, theirs, _grads(model.named_parameters()), _grads(trainer.model.named_parameters()))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert stats["reward_margin"].item() / len(pairs) == pytest.approx(logged["rewards/margins"], rel=1e-4)
    assert stats["reward_accuracy"].item() / len(pairs) == pytest.approx(logged["rewards/accuracies"])
    assert stats["chosen_reward"].item() / len(pairs) == pytest.approx(logged["rewards/chosen"], rel=1e-4)


def test_orpo_loss_and_gradients_equal_trls_orpo_trainer(model_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _qlora_model(model_dir)
    dense, lora = _dense_twin(model, model_dir)
    pairs = _pairs(model_dir)
    tok = _tokenizer(model_dir)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.25, report_to=[], bf16=False,
                      gradient_checkpointing=False, per_device_train_batch_size=4)
    trainer = ORPOTrainer(model=dense, args=args, processing_class=tok, peft_config=lora,
                          train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                           for r in ROWS[:4]]))
    _copy_adapters(model, trainer.model)

    def side(key):  # TRL's padded per-side tensors from qlora's token ids
        seqs = [p.prompt + getattr(p, key) for p in pairs]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.tensor([[-100] * len(p.prompt) + getattr(p, key) + [-100] * (width - len(s))
                               for p, s in zip(pairs, seqs)])
        return {f"{key}_input_ids": ids, f"{key}_attention_mask": mask, f"{key}_labels": labels}

    theirs, logged = trainer.get_batch_loss_metrics(trainer.model, {**side("chosen"), **side("rejected")})
    theirs.backward()
    # TRL's NLL covers the chosen rows' prompt too: qlora's --train-on-prompt
    objective = P.Preference("orpo", beta=0.25, train_on_prompt=True)
    batch = P.collate_pairs(pairs, tok.pad_token_id)
    counts = objective.counts(batch)
    terms, stats = objective.sums(model, batch)
    ours = terms["nll_tokens"] / counts["nll_tokens"] + terms["pairs"] / counts["pairs"]
    ours.backward()
    _assert_same(ours, theirs, _grads(model.named_parameters()), _grads(trainer.model.named_parameters()))
    assert stats["reward_margin"].item() / len(pairs) == pytest.approx(logged["rewards/margins"], rel=1e-4)


def test_orpo_nll_without_prompt_is_the_sft_loss_of_the_chosen_rows(model_dir):
    from qlora.model.loss import causal_lm_loss

    model = _qlora_model(model_dir)
    batch = P.collate_pairs(_pairs(model_dir), _tokenizer(model_dir).pad_token_id)
    objective = P.Preference("orpo", beta=1e-9)  # the odds-ratio term vanishes
    terms, _ = objective.sums(model, batch)
    chosen = {k: v[0::2] for k, v in batch.items()}
    sft = causal_lm_loss(model, chosen)
    torch.testing.assert_close(terms["nll_tokens"] / objective.counts(batch)["nll_tokens"], sft, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method,train_on_prompt,attention", [("dpo", False, "sdpa"), ("orpo", False, "sdpa"),
                                                                ("orpo", True, "sdpa"), ("dpo", False, "varlen")])
def test_the_trainers_batch_gives_the_same_loss_and_reads_nothing_back(model_dir, host_reads, method,
                                                                         train_on_prompt, attention, monkeypatch):
    """As the trainer hands a micro-batch over (share: the completion tokens' index built on the
    host), the DPO / ORPO step reads no value back (a device sync each on a GPU) and gives the
    loss, stats and gradients of the boolean-mask path; ORPO training on prompts still reads.
    With varlen attention (its CPU kernel here) the shared batch runs it, the other SDPA."""
    from qlora.model.attention import set_attention
    from qlora.train.distributed import Ranks, share

    model = _qlora_model(model_dir)
    set_attention(model, attention, "cpu")
    objective = P.Preference(method, train_on_prompt=train_on_prompt)
    batch = P.collate_pairs(_pairs(model_dir), _tokenizer(model_dir).pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(b):
        terms, stats = objective.sums(model, b)
        grads = torch.autograd.grad(sum(terms.values()), params)
        return terms, stats, grads

    ref_terms, ref_stats, ref_grads = run(batch)
    shared = share(batch, Ranks(), boundaries=attention == "varlen")  # the index from the host's labels
    from qlora.model import varlen
    calls, kernel = [], varlen.varlen_cpu
    monkeypatch.setattr(varlen, "varlen_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with host_reads() as reads:
        terms, stats, grads = run(shared)
    assert bool(calls) == (attention == "varlen")
    assert bool(reads.seen) == train_on_prompt, reads.seen
    loose = 1 if attention == "sdpa" else 100  # varlen: attention summed per document, fp32 rounding apart
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-6 * loose, atol=0)
    for k in ref_stats:
        torch.testing.assert_close(stats[k], ref_stats[k], rtol=1e-6 * loose, atol=1e-7 * loose)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5 * loose, atol=1e-8 * loose)


def test_dpo_starts_at_log_2_and_the_reference_ignores_the_adapters(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32,
                  gradient_checkpointing=False, verbose=False)
    batch = P.collate_pairs(_pairs(model_dir), _tokenizer(model_dir).pad_token_id)
    terms, _ = P.Preference("dpo").sums(model, batch)  # fresh adapters (B = 0): policy == reference
    torch.testing.assert_close(terms["pairs"] / 4, torch.tensor(0.6931471805599453), rtol=1e-6, atol=0)
    before = P.reference_log_probs(model, batch)
    randomized = _qlora_model(model_dir)
    torch.testing.assert_close(P.reference_log_probs(randomized, batch), before, rtol=1e-6, atol=0)
    assert not torch.allclose(P.sequence_log_probs(randomized, batch)[0], before)


def test_pairs_from_text_and_chat_rows(model_dir, tmp_path):
    tok = _tokenizer(model_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [("f:1", {"prompt": "add one", "chosen": "x + 1", "rejected": "x - 1"}),
            ("f:2", {"prompt": [{"role": "user", "content": "add one"}],
                     "chosen": [{"role": "assistant", "content": "x + 1"}], "rejected": "x - 1"})]
    (text, chat), skipped = P.tokenize_pairs(rows, tok, 64)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert text.prompt == enc("add one") and text.chosen == enc("x + 1") + [tok.eos_token_id]
    assert chat.prompt == enc("<user>add one\n<assistant>")
    assert chat.chosen == enc("x + 1\n") + [tok.eos_token_id] and chat.rejected == enc("x - 1") + [tok.eos_token_id]
    batch = P.collate_pairs([text, chat], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # c0, r0, c1, r1
    assert batch["input_ids"][2, :len(chat.prompt)].tolist() == chat.prompt
    assert batch["labels"][2].tolist()[len(chat.prompt):len(chat.prompt) + len(chat.chosen)] == chat.chosen
    assert (batch["labels"][2, :len(chat.prompt)] == -100).all()
    # cut to max_length: the completions lose their end, the prompt stays whole
    (cut,), _ = P.tokenize_pairs(rows[:1], tok, len(text.prompt) + 2)
    assert cut.prompt == text.prompt and cut.chosen == text.chosen[:2]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "c"}, r"f:7: a preference row needs 'prompt', 'chosen' and 'rejected'; missing \['rejected'\]"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "f:7: field 'chosen' is missing or empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "f:7: field 'chosen' must be a string"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "f:7: .*chat template"),
    ({"prompt": "p " * 80, "chosen": "c", "rejected": "r"}, "f:7: nothing to learn once cut to --max-length 64"),
    (["p", "c", "r"], "f:7: a row must be a JSON object"),
])
def test_bad_rows_are_named_or_skipped(model_dir, row, message):
    tok = _tokenizer(model_dir)
    good = ("f:1", ROWS[0])
    with pytest.raises(DataError, match=message):
        P.tokenize_pairs([good, ("f:7", row)], tok, 64)
    pairs, skipped = P.tokenize_pairs([good, ("f:7", row)], tok, 64, skip_bad_rows=True)
    assert (len(pairs), skipped) == (1, 1)


def test_flags_that_do_not_fit_the_method_are_refused():
    for bad, match in ((dict(method="ppo"), "--method must be sft, dpo or orpo"),
                       (dict(method="orpo", loss_type="ipo"), "--loss-type ipo is a DPO loss"),
                       (dict(method="orpo", precompute_ref=True), "--precompute-ref computes DPO's"),
                       (dict(method="dpo", beta=0.0), "--beta must be positive")):
        with pytest.raises(ConfigError, match=match):
            validate(TrainConfig(**bad))


def test_dpo_run_metrics_plot_and_precomputed_reference(model_dir, pairs_file, tmp_path):
    runs = {}
    for name, extra in (("live", {}), ("pre", {"precompute_ref": True})):
        summary = train(TrainConfig(model=str(model_dir), data=str(pairs_file), output=str(tmp_path / name),
                                    method="dpo", max_steps=6, eval_every=3, eval_split=0.1, **FAST, **extra))
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    steps = [r for r in runs["live"] if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)  # policy == reference at the start
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_margin"] > 0
    assert all({"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(r) for r in steps)
    evals = [r for r in runs["live"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and "eval_reward_accuracy" in evals[-1]
    assert summary["final_reward_accuracy"] == steps[-1]["reward_accuracy"] and summary["final_eval_ppl"] is None
    assert (tmp_path / "live" / "loss.png").exists()
    # the reference computed once before training gives the same curve (to float rounding)
    for a, b in zip(runs["live"], runs["pre"]):
        assert a.keys() == b.keys()
        for k in ("loss", "reward_margin", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    memory = json.loads((tmp_path / "live" / "memory.json").read_text())
    assert memory["settings"]["objective"] == "dpo" and memory["predicted_peak_bytes"] > 0


def test_orpo_run(model_dir, pairs_file, tmp_path):
    train(TrainConfig(model=str(model_dir), data=str(pairs_file), output=str(tmp_path), method="orpo", max_steps=5,
                      eval_split=0, **FAST))
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 5 and steps[-1]["loss"] < steps[0]["loss"]


def _cli(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--method", "dpo", "--max-steps", "6", "--save-every", "3", "--batch-size", "2", "--grad-accum", "1",
            "--lora-r", "8", "--lr", "1e-3", "--max-length", "64", "--no-demo", "--eval-split", "0", *extra]


def test_cli_resume_continues_the_curve_and_bad_rows(model_dir, pairs_file, tmp_path, capsys):
    """The `qlora train` command in this process (its own tests run it as a subprocess)."""
    from qlora.cli import main

    assert main(_cli(model_dir, pairs_file, tmp_path / "full")) == 0
    full = [(r["step"], r["loss"], r["reward_margin"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    half = tmp_path / "half"
    assert main(_cli(model_dir, pairs_file, half, "--max-steps", "3")) == 0
    assert main(_cli(model_dir, pairs_file, half, "--resume")) == 0
    # --max-steps 3 then 6 keeps the schedule constant after warmup (constant_with_warmup, 0 warmup steps)
    resumed = [(r["step"], r["loss"], r["reward_margin"]) for r in read_metrics(half / "metrics.jsonl")]
    assert resumed == full

    bad = write_rows(tmp_path / "bad.jsonl", ROWS[:6] + [{"prompt": "p", "chosen": "c"}])
    capsys.readouterr()
    assert main(_cli(model_dir, bad, tmp_path / "bad")) == 2
    assert f"{bad}:7: a preference row needs 'prompt', 'chosen' and 'rejected'" in capsys.readouterr().err
    assert main(_cli(model_dir, bad, tmp_path / "skip", "--skip-bad-rows", "--max-steps", "1")) == 0
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_rows"] == 1
