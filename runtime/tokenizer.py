"""Tokenizer: a `tokenizers.Tokenizer` plus what the model expects around it (BOS, end-of-turn ids, chat template).

Built either from an HF directory's `tokenizer.json` or rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
`DetokenizeStream` turns generated ids into text one token at a time without ever emitting half a character.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .chat_template import ChatTemplate
from .errors import CheckpointError, ConfigError

# Tokens that close a chat turn (HF generation configs list these beside eos).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# llama.cpp's `tokenizer.ggml.token_type` values (llama_token_type).
_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4

# `tokenizer.ggml.pre` values whose split is GPT-2's regex with every digit isolated first: llama.cpp gives these
# the regexes ["\p{N}", gpt2], which is HF's Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]
# (the pre-tokenizer of SmolLM2's and StarCoder's tokenizer.json).
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"})
# Plain GPT-2 regex.
_GPT2 = frozenset({"gpt2", "default", "mpt", "olmo", "jais", "trillion", "gpt-2"})


class Tokenizer:
    """Text <-> token ids for one model.

    backend: the `tokenizers.Tokenizer` (no post-processor is relied on: BOS is added here, per `add_bos`).
    bos_id / eos_id: the checkpoint's BOS and EOS ids (either may be None); `eos_ids` (all ids that end
    generation) adds extra_eos_ids and the end-of-turn token of the chat template.
    add_bos: whether `encode` prepends BOS by default. chat_template: Jinja source or None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None, source: str, extra_eos_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        # Generation stops on eos, on ids the checkpoint lists beside it, and on the end-of-turn token the chat
        # template writes (SmolLM2-Instruct: eos is <|im_end|> itself; Llama 3: eos <|end_of_text|> + <|eot_id|>).
        stop = {eos_id, *extra_eos_ids} - {None}
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is not None and chat_template is not None and token in chat_template:
                stop.add(token_id)
        self.eos_ids: frozenset[int] = frozenset(stop)
        special = {"bos_token": self._token(bos_id), "eos_token": self._token(eos_id)}
        self._template = ChatTemplate(chat_template, special, source) if chat_template else None

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte tokens (<0x00>..<0xFF>). The ByteFallback decoder renders a run of them as
        one UTF-8 string, or as one U+FFFD per token if the whole run is invalid, so a run is final only once a
        token of another kind follows it."""
        return frozenset(i for token, i in self.backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (those `decode(..., skip_special_tokens=True)` drops)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") encode to their one id.

        add_bos: prepend BOS; None means the model's default (`self.add_bos`).
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise ConfigError(f"{self.source}: add_bos requested but the tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form complete UTF-8 characters decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """Id of one token string (as the vocabulary spells it), or None."""
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation, rendered with the checkpoint's chat template.

        Encode the result with `add_bos=False` when the template writes BOS itself.
        """
        if self._template is None:
            raise ConfigError(f"{self.source}: the checkpoint has no chat template")
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def stream(self, skip_special_tokens: bool = True) -> DetokenizeStream:
        """A fresh incremental detokenizer for one generated sequence."""
        return DetokenizeStream(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------------- builders

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], source: str) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes.

        fields: the file's metadata, key -> value, either plain Python values or `gguf.ReaderField`s
        (`GGUFReader.fields`). source: the file, for error messages.
        """
        meta = _GGUFMetadata(fields, source)
        model = meta.get("tokenizer.ggml.model")
        if model == "gpt2":
            backend = _byte_level_bpe(meta)
        elif model == "llama":
            backend = _sentencepiece_bpe(meta)
        else:
            raise CheckpointError(f"{source}: unsupported GGUF tokenizer model {model!r} "
                                  f"(tokenizer.ggml.model; supported: 'gpt2', 'llama')")
        _add_gguf_special_tokens(backend, meta)

        n_tokens = len(meta.require("tokenizer.ggml.tokens"))
        bos_id = meta.token_id("tokenizer.ggml.bos_token_id", n_tokens)
        eos_id = meta.token_id("tokenizer.ggml.eos_token_id", n_tokens)
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise, never to GPT-2 ones.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"), source=source)

    @classmethod
    def from_hf(cls, tokenizer_file: Path, tokenizer_config: Mapping[str, Any], *,
                model_config: Mapping[str, Any] | None = None, generation_config: Mapping[str, Any] | None = None,
                chat_template: str | None = None) -> Tokenizer:
        """The tokenizer of an HF checkpoint: `tokenizer.json` plus the parsed tokenizer_config.json (special
        tokens, add_bos_token, chat_template), config.json and generation_config.json (bos/eos ids).
        chat_template: the text of chat_template.jinja, which takes precedence over tokenizer_config's."""
        source = str(tokenizer_file)
        try:
            backend = tokenizers.Tokenizer.from_file(source)
        except Exception as e:  # the Rust side raises plain Exception for every parse error
            raise CheckpointError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from e
        model_config = model_config or {}
        generation_config = generation_config or {}

        bos_id = _hf_token_id(backend, tokenizer_config.get("bos_token"), source)
        eos_id = _hf_token_id(backend, tokenizer_config.get("eos_token"), source)
        if bos_id is None and isinstance(model_config.get("bos_token_id"), int):
            bos_id = model_config["bos_token_id"]
        extra_eos = []
        for config in (model_config, generation_config):
            value = config.get("eos_token_id")
            extra_eos.extend(i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int))
        if eos_id is None and extra_eos:
            eos_id = extra_eos[0]

        template = chat_template if chat_template is not None else _hf_chat_template(tokenizer_config)
        if "add_bos_token" in tokenizer_config:
            add_bos = bool(tokenizer_config["add_bos_token"])
        else:
            # No flag: the tokenizer.json post-processor decides (Llama's TemplateProcessing adds BOS).
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                   source=source, extra_eos_ids=extra_eos)


class DetokenizeStream:
    """Incremental detokenizer: feed generated ids one at a time, get back only the newly completed text.

    Text is held back while the decoded tail ends in U+FFFD (a character whose bytes are still arriving) or
    the last token is a sentencepiece byte token or a skipped special token (the next token may change how a
    run of byte tokens decodes, and skipped tokens do not end a run); `flush()` releases what is left. The pieces concatenated equal `tokenizer.decode(all_ids)` exactly.
    Each step decodes a short window (the tokens since the last emitted boundary) rather than everything.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._hold_ids = tokenizer.byte_fallback_ids | (tokenizer.special_ids if skip_special_tokens else frozenset())
        self.ids: list[int] = []
        # Token offsets: the window starts at the previous emission's first token, and text up to `_read_offset`
        # has been emitted. Decoding the window twice (without and with the new tokens) and taking the
        # difference keeps context-dependent decoders (sentencepiece's leading-space strip) consistent.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        if token_id in self._hold_ids:
            return ""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        if text.endswith("\ufffd") or not text.startswith(prefix):
            return ""
        new_text = text[len(prefix):]
        if new_text:
            # Only a span that rendered something may start the next window: a window whose prefix renders
            # nothing (skipped special tokens) would let sentencepiece's leading-space strip hit the new token.
            self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return new_text

    def flush(self) -> str:
        """Return the held-back tail (incomplete characters become U+FFFD, as in `decode`)."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix):]


# --------------------------------------------------------------------------------------------------- GGUF

class _GGUFMetadata:
    """Typed access to GGUF metadata with errors that name the file and key."""

    def __init__(self, fields: Mapping[str, Any], source: str) -> None:
        self.fields = fields
        self.source = source

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.fields:
            return default
        value = self.fields[key]
        return value.contents() if hasattr(value, "contents") else value

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.source}: GGUF metadata has no {key!r}")
        return self.get(key)

    def token_id(self, key: str, n_tokens: int) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < n_tokens:
            raise CheckpointError(f"{self.source}: {key}={value!r} is not a token id (vocabulary has {n_tokens})")
        return value


def _byte_level_bpe(meta: _GGUFMetadata) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE: tokens are already spelled in the byte alphabet, merges are "a b" strings."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        split = byte_level
    else:
        # Other values (llama3, qwen2, ...) split with their own regexes; guessing would silently change ids.
        raise CheckpointError(f"{meta.source}: unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre; "
                              f"supported: {', '.join(sorted(_DIGITS_THEN_GPT2 | _GPT2))})")
    vocab = _vocab(meta.require("tokenizer.ggml.tokens"))
    backend = _bpe(meta.source, vocab=vocab, merges=_merges(meta, vocab), fuse_unk=False, byte_fallback=False)
    backend.pre_tokenizer = split
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: _GGUFMetadata) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 1/2, Mistral): "▁" for spaces, byte-fallback tokens <0xNN>, merges from scores.

    Mirrors the tokenizer transformers builds for these files (its LlamaTokenizer): Metaspace with the prefix
    space on the first section, BPE with byte fallback, and the inverse decoder chain.
    """
    tokens = meta.require("tokenizer.ggml.tokens")
    vocab = _vocab(tokens)
    if "tokenizer.ggml.merges" in meta.fields:
        merges = _merges(meta, vocab)
    else:
        scores = meta.require("tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise CheckpointError(f"{meta.source}: tokenizer.ggml.scores has {len(scores)} entries for "
                                  f"{len(tokens)} tokens")
        merges = _merges_from_scores(vocab, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = _bpe(meta.source, vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first" if add_prefix else "never",
                                                     split=False)
    chain = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(chain)
    return backend


def _bpe(source: str, **options: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(models.BPE(**options))
    except Exception as e:  # the Rust side raises plain Exception for what it rejects
        raise CheckpointError(f"{source}: GGUF tokenizer vocabulary/merges are inconsistent ({e})") from e


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    # A spelling listed twice maps to its last id, as in llama.cpp's token_to_id and transformers' GGUF loader.
    return {token: index for index, token in enumerate(tokens)}


def _merges(meta: _GGUFMetadata, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for merge in meta.require("tokenizer.ggml.merges"):
        left, sep, right = merge.partition(" ")
        # Checked here: on a merge of unknown tokens the Rust BPE panics, which `except Exception` cannot catch.
        if not sep or left not in vocab or right not in vocab or left + right not in vocab:
            raise CheckpointError(f"{meta.source}: tokenizer.ggml.merges entry {merge!r} does not merge two "
                                  f"tokens of the vocabulary into a third")
        merges.append((left, right))
    return merges


def _merges_from_scores(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, ranked by the
    merged token's score (higher first), ties broken the way transformers' `generate_merges` breaks them."""
    candidates = []
    for token, index in vocab.items():
        score = scores[index]
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, meta: _GGUFMetadata) -> None:
    """Control tokens become special added tokens (matched whole, skipped by decode); user-defined tokens become
    plain added tokens (matched whole, kept by decode), as llama.cpp treats them."""
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return
    if len(types) != len(tokens):
        raise CheckpointError(f"{meta.source}: tokenizer.ggml.token_type has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == _GGUF_TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == _GGUF_TOKEN_USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


# ----------------------------------------------------------------------------------------------------- HF

def _hf_token_id(backend: tokenizers.Tokenizer, token: Any, source: str) -> int | None:
    """tokenizer_config.json spells special tokens as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    if not isinstance(token, str):
        raise CheckpointError(f"{source}: special token {token!r} in tokenizer_config.json is not a string")
    return backend.token_to_id(token)


def _hf_chat_template(tok_config: Mapping[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        # Named templates ([{"name": "default", "template": ...}, {"name": "tool_use", ...}]): use the default.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

