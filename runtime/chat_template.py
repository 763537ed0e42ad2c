"""Chat templates: the Jinja2 template a checkpoint ships, rendered the way Hugging Face renders it.

Templates come from the checkpoint (GGUF `tokenizer.chat_template`, or `tokenizer_config.json` /
`chat_template.jinja` in an HF directory), so they are untrusted code: they run in Jinja2's immutable sandbox.
The environment mirrors transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, the loopcontrols
extension, a `tojson` filter that keeps non-ASCII, `raise_exception`, `strftime_now`) so a template written for
HF renders to the same string here.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError, RequestError


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to (`bos_token`, `eos_token`, ...).

    `source` names where the template came from, for error messages.
    """

    def __init__(self, template: str, special_tokens: dict[str, str | None], source: str) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens)
        self.source = source
        self._compiled: jinja2.Template | None = None

    def _compile(self) -> jinja2.Template:
        # Compiled on first use: a model with a broken template still loads and completes plain prompts.
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(self.template)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{self.source}: chat template does not compile: {e.message} "
                                  f"(template line {e.lineno})") from e
        return self._compiled

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

        `extra` is passed to the template as further variables (e.g. `tools`, `documents`).
        Raises RequestError when the messages are malformed or the template refuses them.
        """
        _check_messages(messages)
        template = self._compile()
        variables = {**self.special_tokens, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return template.render(**variables)
        except RequestError:
            raise
        except jinja2.TemplateError as e:
            # Undefined variables, sandbox violations, filter misuse: the template cannot handle these messages.
            raise RequestError(f"{self.source}: chat template failed on these messages: {e}") from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"chat message {index} must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise RequestError(f"chat message {index} has no string 'role': {message!r}")


def _raise_exception(message: str) -> None:
    raise RequestError(f"chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # HF's filter: unlike Jinja's built-in it keeps non-ASCII text as is and does not HTML-escape.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
