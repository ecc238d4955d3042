"""A model's chat template (``tokenizer_config.json``'s Jinja ``chat_template``) rendered as ``transformers``'
``apply_chat_template`` renders it, in Jinja's immutable sandbox: the template comes with a downloaded model,
so it may not reach Python's objects, only the messages and the special tokens."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import partial

from job.core.errors import JobError

MAX_TEMPLATE_CHARS = 1 << 20
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*[-+]?%\}")
LOOP_CONTROLS = "jinja2.ext.loopcontrols"  # {% break %} and {% continue %}, as transformers allows


class ChatTemplateError(JobError):
    """A chat template that does not compile or render; the message is one line."""


class TemplateRefusal(ChatTemplateError):
    """The template's own ``raise_exception``: these messages, not the template, are what it refuses."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own HTML-escapes, which would change the text a model was trained on
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(where: str, message: str):
    raise TemplateRefusal(f"{where}: the chat template refused the messages: {str(message)[:200]}")


def _strftime_now(pattern: str) -> str:
    return datetime.now().strftime(pattern)


def _generation_extension():
    """Jinja's ``{% generation %}...{% endgeneration %}`` block, as transformers' ``AssistantTracker`` reads it:
    the block's text as is; while a render tracks (``tracking`` holds the blocks rendered so far and the spans),
    the block's character span in the rendered text is recorded."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationSpans(Extension):
        tags = {"generation"}
        tracking: tuple[list[str], list[tuple[int, int]]] | None = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

        def _span(self, caller):
            text = caller()
            if self.tracking is not None:
                blocks, spans = self.tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    return GenerationSpans


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
            extensions = [LOOP_CONTROLS, _generation_extension()]
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
            env.filters["tojson"] = _tojson
            env.globals |= {"raise_exception": partial(_raise, self.where), "strftime_now": _strftime_now}
            try:
                self._template = env.from_string(self.source)
                self._tracker = next(e for e in env.extensions.values() if hasattr(e, "tracking"))
            except TemplateError as exc:
                raise ChatTemplateError(f"{self.where}: chat_template does not compile: {str(exc)[:200]}") from None
        return self._template

    def prompt(self, messages: list[dict]) -> str:
        """The conversation with the template's generation prompt after it: what the model answers."""
        return self.render(messages, add_generation_prompt=True)[0]

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks the assistant's text with ``{% generation %}`` blocks (TRL's training
        templates do): then those blocks, as transformers reads them, are what assistant-only loss trains."""
        return GENERATION_TAG.search(self.source) is not None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the character spans of its ``{% generation %}`` blocks (in order)."""
        from jinja2 import TemplateError

        template = self._compiled()
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        self._tracker.tracking = (blocks, spans)
        try:
            variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, **self.variables}
            for block in template.generate(**variables):
                blocks.append(block)
            return "".join(blocks), spans
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"{self.where}: chat_template fails to render: {str(exc)[:200]}") from None
        finally:
            self._tracker.tracking = None
