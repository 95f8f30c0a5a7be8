"""Chat templates: how an instruct model wants a conversation written out as one string of text.

An instruct model was fine-tuned on conversations laid out in one exact format (SmolLM2 and Qwen use
ChatML). The format ships with the model as a Jinja template: ``chat_template`` in tokenizer_config.json,
or ``tokenizer.chat_template`` in a GGUF file's metadata::

    messages = [{"role": "user", "content": "Hi"}]
        --render(template, add_generation_prompt=True)-->
    "<|im_start|>system\\nYou are a helpful AI assistant ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n"
    "<|im_start|>assistant\\n"                        <- the generation prompt: the model writes the reply next
        --tokenizer.encode(add_special_tokens=False)--> token ids

A prompt written any other way (no generation prompt, a missing newline, BOS added twice) is text the
model never saw in training: it still answers, only worse. So the template is rendered the way
transformers renders it (``transformers.utils.chat_template_utils``): a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that does not escape
HTML, ``raise_exception`` and ``strftime_now``, the special tokens (``bos_token``, ``eos_token``, ...)
as variables, and the rendered text tokenised without adding special tokens again.
"""
from __future__ import annotations

import datetime
import functools
import json

__all__ = ["render_chat_template", "check_messages"]


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML; chat templates want the plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %} ... {% endgeneration %}`` marks the assistant's text (transformers uses it for
        training masks); rendering a prompt only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def check_messages(messages) -> list[dict]:
    """A conversation is a list of {"role": str, "content": ...} dicts; say which message is wrong if not."""
    if isinstance(messages, (str, dict)) or not hasattr(messages, "__iter__"):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts, "
                         f"got {type(messages).__name__}")
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"messages[{i}] = {m!r}: each message needs a string 'role' and a 'content'")
    return messages


def render_chat_template(template: str, messages, add_generation_prompt: bool = False,
                         special_tokens: dict[str, str | None] | None = None, **kwargs) -> str:
    """The conversation as the text the model was trained on.

    ``special_tokens`` are the template variables transformers passes (``bos_token``, ``eos_token``,
    ``unk_token``, ``pad_token``: strings); ``kwargs`` go to the template too (``tools``, ``documents``,
    or a template's own switches such as ``enable_thinking``) and override them.
    """
    import jinja2

    if not isinstance(template, str) or not template:
        raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or the GGUF metadata): "
                         "write the prompt yourself, or pass a template")
    messages = check_messages(messages)
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None))
    variables.update(kwargs)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or an undefined call
        raise ValueError(f"the model's chat template refused this conversation: {e}") from None
