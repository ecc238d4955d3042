"""A model's chat template (``tokenizer_config.json``'s Jinja ``chat_template``) rendered as ``transformers``'
``apply_chat_template`` renders it, in Jinja's immutable sandbox: the template comes with a downloaded model,
so it may not reach Python's objects, only the messages and the special tokens."""

from __future__ import annotations

import json
from datetime import datetime

from job.core.errors import JobError

MAX_TEMPLATE_CHARS = 1 << 20
LOOP_CONTROLS = "jinja2.ext.loopcontrols"  # {% break %} and {% continue %}, as transformers allows


class ChatTemplateError(JobError):
    """A chat template that does not compile or render; the message is one line."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own HTML-escapes, which would change the text a model was trained on
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {str(message)[:200]}")


def _strftime_now(pattern: str) -> str:
    return datetime.now().strftime(pattern)


class ChatTemplate:
    """One template, compiled when first used (a broken one matters to ``--prompt-style chat`` only);
    ``variables`` are the special tokens it may name (``bos_token``, ...)."""

    def __init__(self, source: str, variables: dict[str, str], where: str):
        self.source, self.variables, self.where = source, dict(variables), where
        self._template = None

    def _compiled(self):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._template is None:
            if not isinstance(self.source, str) or len(self.source) > MAX_TEMPLATE_CHARS:
                limit = f"{MAX_TEMPLATE_CHARS:,} characters"
                raise ChatTemplateError(f"{self.where}: chat_template is not text of at most {limit}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[LOOP_CONTROLS])
            env.filters["tojson"] = _tojson
            env.globals |= {"raise_exception": _raise, "strftime_now": _strftime_now}
            try:
                self._template = env.from_string(self.source)
            except TemplateError as exc:
                raise ChatTemplateError(f"{self.where}: chat_template does not compile: {str(exc)[:200]}") from None
        return self._template

    def prompt(self, messages: list[dict]) -> str:
        """The conversation with the template's generation prompt after it: what the model answers."""
        from jinja2 import TemplateError

        template = self._compiled()
        try:
            return template.render(messages=messages, add_generation_prompt=True, **self.variables)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"{self.where}: chat_template fails to render: {str(exc)[:200]}") from None
