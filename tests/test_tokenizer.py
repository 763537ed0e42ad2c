"""Tokenizer rebuilt from GGUF metadata: parity with transformers, chat template, incremental detokenizer.

Real data only: the bundled SmolLM2 GGUF (byte-level BPE) and a sentencepiece-style vocabulary trained here on
gensim's Lee corpus and written to a GGUF file (tokenizer metadata only).
"""
import importlib.util
import json
import random
from pathlib import Path

import gguf
import pytest
import tokenizers

from ringlet.checkpoint import default_model_path
from ringlet.errors import CheckpointError, ConfigError, RequestError
from ringlet.gguf_loader import open_gguf
from ringlet.tokenizer import DetokenizeStream, Tokenizer

# gensim's Lee corpus (300 news paragraphs) as real text; located without importing gensim, which is slow to import.
_GENSIM = importlib.util.find_spec("gensim")
if _GENSIM is None:
    pytest.skip("gensim (a test dependency) provides the text corpus", allow_module_level=True)
LEE = Path(_GENSIM.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"

EXTRA_TEXTS = [
    "naïve café — 日本語 🙂",
    "Ünïcödé: Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어, ไทย, 🇺🇸👍🏽❤️",
    "def f(x):\n    return x ** 2  # 3.14159\n\n\tif x != 0: print(f'{x:>10}')\n",
    "12345 and 3.14159 and 1,000,000; 2024-01-31T12:00:00Z",
    "  leading spaces, trailing   \n\n\n and \r\n windows newlines\t\ttabs",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "",
]


def _texts() -> list[str]:
    return LEE.read_text(encoding="utf-8").splitlines() + EXTRA_TEXTS


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    path = default_model_path()
    return Tokenizer.from_gguf(open_gguf(path).fields, source=str(path))


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ------------------------------------------------------------------------------------------- SmolLM2 (gpt2)

def test_smollm2_special_ids_and_defaults(smol):
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.token_id("<|im_start|>") == 1
    assert smol.eos_id == 2 and smol.token_id("<|im_end|>") == 2
    assert smol.eos_ids == frozenset({2})  # as SmolLM2-Instruct's generation_config
    assert smol.add_bos is False
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("hi", add_bos=True)[0] == 1 and smol.encode("hi")[0] != 1
    assert smol.encode("a<|im_end|>b") == smol.encode("a") + [2] + smol.encode("b")


def test_smollm2_digits_are_split_like_llama_cpp(smol):
    # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 regex, as SmolLM2's tokenizer.json
    # (Digits(individual_digits) + ByteLevel) does: a run of spaces before a number stays one token.
    pieces = [smol.backend.id_to_token(i) for i in smol.encode("Hello  123")]
    assert pieces == ["Hello", "\u0120\u0120", "1", "2", "3"]


def test_smollm2_roundtrip(smol):
    for text in _texts():
        assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_smollm2_matches_transformers_exactly(smol, hf_smol):
    """Same ids as transformers' tokenizer for this GGUF, once its pre-tokenizer is SmolLM2's own.

    transformers builds "smollm" GGUF tokenizers with the plain GPT-2 split (no digit isolation), so the
    vocabulary, merges, special tokens and decoder are compared against it with the pre-tokenizer of SmolLM2's
    tokenizer.json installed on a copy.
    """
    reference = tokenizers.Tokenizer.from_str(hf_smol.backend_tokenizer.to_str())
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = _texts()
    mismatched = [t for t in texts if smol.encode(t) != reference.encode(t, add_special_tokens=False).ids]
    assert mismatched == []
    assert len(texts) > 300


def test_smollm2_matches_transformers_gguf_tokenizer_where_digit_split_is_moot(smol, hf_smol):
    """Against transformers' GGUF tokenizer unchanged. The two splits differ only where a run of two or more
    whitespace characters precedes a digit (GPT-2's regex gives the run's last space to the number, and the
    vocabulary has no token mixing digits with other characters), so every other text must match."""
    def digit_after_whitespace_run(text):
        return any(a.isspace() and b.isspace() and c.isnumeric() for a, b, c in zip(text, text[1:], text[2:]))

    texts = [t for t in _texts() if not digit_after_whitespace_run(t)]
    assert len(texts) > 290
    for text in texts:
        assert smol.encode(text) == hf_smol(text, add_special_tokens=False).input_ids, text
        ids = smol.encode(text)
        assert smol.decode(ids) == hf_smol.decode(ids, skip_special_tokens=True)


def test_smollm2_chat_template_matches_transformers(smol, hf_smol):
    conversations = [
        [{"role": "user", "content": "What is 7 times 8?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve café — 日本語 🙂"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Tell me a joke\nabout {{ jinja }}"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = hf_smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
            assert ours == theirs
    prompt = smol.apply_chat_template(conversations[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert smol.encode(prompt).count(1) == 3  # <|im_start|> for system, user, assistant


def test_chat_template_errors(smol):
    with pytest.raises(RequestError, match="message 0"):
        smol.apply_chat_template([{"content": "no role"}])
    with pytest.raises(RequestError, match="list"):
        smol.apply_chat_template("hello")
    strict = Tokenizer(smol.backend, bos_id=1, eos_id=2, add_bos=False, source="strict-template",
                       chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                     "{% endif %}{{ messages | tojson }}")
    assert strict.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
    with pytest.raises(RequestError, match="user first"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    broken = Tokenizer(smol.backend, bos_id=1, eos_id=2, add_bos=False, source="broken-template",
                       chat_template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="broken-template"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    sandboxed = Tokenizer(smol.backend, bos_id=1, eos_id=2, add_bos=False, source="evil-template",
                          chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="evil-template"):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])
    none = Tokenizer(smol.backend, bos_id=1, eos_id=2, add_bos=False, source="no-template", chat_template=None)
    with pytest.raises(ConfigError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------ incremental detokenizer

def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    stream = DetokenizeStream(tokenizer, skip_special_tokens=skip_special_tokens)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_detokenizer_concatenates_to_decode_on_real_text(smol):
    for text in _texts():
        ids = smol.encode(text)
        pieces = _stream(smol, ids, skip_special_tokens=False)
        assert "".join(pieces) == smol.decode(ids, skip_special_tokens=False) == text
        assert "".join(_stream(smol, ids)) == smol.decode(ids)
        assert not any("\ufffd" in p for p in pieces), text  # never half a character


def test_detokenizer_holds_back_partial_characters(smol):
    text = "naïve café — 日本語 🙂"
    ids = smol.encode(text)
    pieces = _stream(smol, ids)
    assert "" in pieces[:-1]  # some multi-byte character arrived over several tokens
    assert "".join(pieces) == text
    assert any("🙂" in p for p in pieces)


def test_detokenizer_on_random_token_streams(smol):
    """Random ids (byte fragments, special tokens, anything): pieces + flush equal decode(all)."""
    rng = random.Random(1234)
    vocab = smol.vocab_size
    # Bias toward byte-level fragments of multi-byte characters, the hard case.
    fragments = sorted({i for t in EXTRA_TEXTS for i in smol.encode(t)})
    for _ in range(200):
        ids = [rng.choice(fragments) if rng.random() < 0.5 else rng.randrange(vocab)
               for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            stream = DetokenizeStream(smol, skip_special_tokens=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == smol.decode(ids, skip_special_tokens=skip)


def test_detokenizer_on_random_slices_of_real_text(smol):
    rng = random.Random(7)
    ids = smol.encode(" ".join(_texts()[:40]) + " ".join(EXTRA_TEXTS))
    for _ in range(100):
        start = rng.randrange(len(ids))
        chunk = ids[start:start + rng.randrange(1, 60)]  # may start or end inside a character
        assert "".join(_stream(smol, chunk)) == smol.decode(chunk)


# --------------------------------------------------------------------------------- sentencepiece ("llama")

@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    """A sentencepiece-style BPE vocabulary (byte fallback tokens, scores, no merges), trained on the Lee corpus
    and written as llama.cpp writes one: tokenizer metadata of a GGUF file with no tensors."""
    trainer = tokenizers.SentencePieceBPETokenizer()
    trainer.train_from_iterator(LEE.read_text(encoding="utf-8").splitlines()[:150], vocab_size=800,
                                min_frequency=2, show_progress=False, special_tokens=[])
    model = json.loads(trainer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(pieces))]
    path = tmp_path_factory.mktemp("spm") / "spm-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm(spm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(spm_gguf).fields, source=str(spm_gguf))


def test_sentencepiece_defaults(spm):
    assert spm.add_bos is True and spm.bos_id == 1 and spm.eos_ids == frozenset({2})
    assert spm.encode("hello")[0] == 1 and spm.encode("hello", add_bos=False)[0] != 1
    # Characters outside the vocabulary fall back to byte tokens and decode back whole.
    ids = spm.encode("日本語 🙂", add_bos=False)
    assert all(spm.backend.id_to_token(i).startswith(("<0x", "\u2581")) for i in ids)
    assert spm.decode(ids) == "日本語 🙂"


def test_sentencepiece_matches_transformers(spm, spm_gguf):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
    reference = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    texts = _texts() + ["Hello  123 <s>x</s>", "  leading"]
    for text in texts:
        ids = spm.encode(text)
        assert ids == reference(text).input_ids, text
        assert spm.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_sentencepiece_detokenizer(spm):
    for text in _texts()[:60] + EXTRA_TEXTS:
        ids = spm.encode(text)
        pieces = _stream(spm, ids)
        assert "".join(pieces) == spm.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    # Random streams: byte-fallback tokens that do not form characters, leading spaces the decoder strips.
    rng = random.Random(99)
    for _ in range(200):
        ids = [rng.randrange(spm.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(spm, ids)) == spm.decode(ids)


# ------------------------------------------------------------------------------------------- bad metadata

def test_unsupported_gguf_tokenizer_models_are_refused(smol):
    fields = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(CheckpointError, match=r"x\.gguf: unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(fields, source="x.gguf")
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b"],
              "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(CheckpointError, match="pre-tokenizer 'qwen2'"):
        Tokenizer.from_gguf(fields, source="x.gguf")
    for merges in (["a c"], ["a b"], ["ab"]):  # unknown token, merged token not in the vocabulary, no space
        fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": merges}
        with pytest.raises(CheckpointError, match=r"x\.gguf: tokenizer.ggml.merges entry"):
            Tokenizer.from_gguf(fields, source="x.gguf")
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
              "tokenizer.ggml.eos_token_id": 7}
    with pytest.raises(CheckpointError, match="eos_token_id=7"):
        Tokenizer.from_gguf(fields, source="x.gguf")
