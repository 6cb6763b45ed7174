"""report.demo_generations: the prompts generated in one left-padded batch give what each gives alone."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import qlora
from qlora.train.report import demo_generations

PROMPTS = ["Write a function that adds 3.", "Add two numbers.", "def f7(x):\n    return x + 7\nWrite a function that adds 9."]
CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"


@pytest.fixture(scope="module")
def varied_model_dir(model_dir, tmp_path_factory):
    """The tiny model's tokenizer on a random Llama of large weights: its greedy text depends on
    the prompt (the default init's small weights repeat one token whatever comes before)."""
    path = tmp_path_factory.mktemp("varied")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(path)
    config = LlamaConfig.from_pretrained(model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("template", [None, CHAT], ids=["alpaca", "chat-template"])
def test_batched_demo_generations_equal_one_prompt_at_a_time(varied_model_dir, template):
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    tokenizer.chat_template = template
    model = qlora.load_model(varied_model_dir, compute_dtype=torch.float32, progress=False)
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # every prompt but the longest is padded in the batch
    alone = {p: demo_generations(model, tokenizer, [p], max_new_tokens=24)[p] for p in PROMPTS}
    together = demo_generations(model, tokenizer, PROMPTS, max_new_tokens=24)
    assert together == alone
    assert all(alone.values()) and len(set(alone.values())) == len(PROMPTS)
