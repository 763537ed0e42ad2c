"""The bundled model against an independent implementation: HF transformers loading the same GGUF file
(its own GGUF reader, dequantizer, Q/K un-permutation and Llama code), float32 on the CPU."""
import os

import pytest
import torch

from ringlet import SamplingParams

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
    "Rain fell on the old stone bridge while",
]


@pytest.fixture(scope="module")
def hf_model():
    from ringlet.checkpoint import default_model_path
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
    return model.eval()


def _hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding by full recomputation (no cache API, no logits processors that touch eos)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_continuations_match_transformers(llm, hf_model):
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for prompt in PROMPTS:
        ours = llm.generate(prompt, params)[0]
        theirs = _hf_greedy(hf_model, ours.prompt_token_ids, 32)
        assert ours.token_ids == theirs, prompt


def test_prompt_logprobs_match_transformers(llm, hf_model):
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ours = llm.engine.score(ids)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0, :-1]
    theirs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
