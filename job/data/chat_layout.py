"""The prompt a model was trained on as a runtime's chat template: an Ollama ``TEMPLATE`` (Go's text/template)
and a GGUF ``tokenizer.chat_template`` (Jinja), both from one ``TurnLayout``: the fixed text around each
message, read off the prompt style (Alpaca, Phi-3) or, for ``chat``, off the model's own template rendered
around marker messages (a template whose text around a message is not fixed is refused, exit 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from job.core.errors import ConfigError
from job.data.instructions import ChatStyle, PromptStyle

# Stand-ins for message contents while a chat template is read: words no template writes itself.
MARKERS = ("QXUSERONEQX", "QXASSISTANTONEQX", "QXUSERTWOQX", "QXASSISTANTTWOQX", "QXUSERTHREEQX")


@dataclass(frozen=True)
class TurnLayout:
    """A conversation is ``first`` + user + (``reply`` + assistant + ``next`` + user)* + ``generation``."""

    first: str
    """Before the first user message."""
    reply: str
    """Between a user message and the assistant's answer to it."""
    next: str
    """Between an assistant's answer and the next user message."""
    generation: str
    """After the last user message: what the model answers after."""

    def render(self, messages: list[dict]) -> str:
        """The text of a conversation ending in a user message (what a runtime hands the model)."""
        parts, seen_user = [], False
        for message in messages:
            if message["role"] == "user":
                parts += [self.next if seen_user else self.first, message["content"]]
                seen_user = True
            elif message["role"] == "assistant":
                parts += [self.reply, message["content"]]
        return "".join(parts) + self.generation

    def go_template(self) -> str:
        """Ollama's ``TEMPLATE``: the same text from ``.Messages`` (system messages are left out: the job trains
        none). Every fixed piece is a Go string literal (JSON's escapes are Go's), so no text of the model's
        can read as template syntax, nor close the Modelfile's triple quotes."""
        first, reply, nxt, gen = (_quoted(p) for p in (self.first, self.reply, self.next, self.generation))
        return (
            "{{- $seen := false }}{{- range .Messages }}"
            f'{{{{- if eq .Role "user" }}}}'
            f"{{{{ if $seen }}}}{{{{ {nxt} }}}}{{{{ else }}}}{{{{ {first} }}}}{{{{ end }}}}"
            "{{ .Content }}{{ $seen = true }}"
            f'{{{{- else if eq .Role "assistant" }}}}{{{{ {reply} }}}}{{{{ .Content }}}}{{{{- end }}}}'
            f"{{{{- end }}}}{{{{ {gen} }}}}"
        )

    def jinja_template(self) -> str:
        """GGUF's ``tokenizer.chat_template`` for a prompt style: the same text from ``messages``."""
        first, reply, nxt, gen = (_quoted(p) for p in (self.first, self.reply, self.next, self.generation))
        return (
            "{%- set ns = namespace(seen=false) %}{%- for message in messages %}"
            f"{{%- if message['role'] == 'user' %}}{{{{ ({nxt} if ns.seen else {first}) + message['content'] }}}}"
            "{%- set ns.seen = true %}"
            f"{{%- elif message['role'] == 'assistant' %}}{{{{ {reply} + message['content'] }}}}{{%- endif %}}"
            f"{{%- endfor %}}{{%- if add_generation_prompt %}}{{{{ {gen} }}}}{{%- endif %}}"
        )


def _quoted(text: str) -> str:
    """``text`` as a double-quoted literal that Go and Jinja read back alike (non-ASCII kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def entry_message(style: PromptStyle, entry: dict) -> str:
    """What a user types for ``entry`` so that the layout renders the style's prompt: the prompt less its fixed
    head (the instruction, and the input as the style lays it out: Alpaca's ``\\n\\n### Input:\\n``)."""
    if isinstance(style, ChatStyle):
        return entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
    head = style.format_input({"instruction": "", "input": ""})
    return style.format_input(entry)[len(head) :]


def turn_layout(style: PromptStyle, end_text: str) -> TurnLayout:
    """The layout of ``style``: the prompt's head, the response header after each user message, the end token
    after each answer; for ``chat``, read off the model's template (``chat_layout``)."""
    if isinstance(style, ChatStyle):
        return chat_layout(style)
    head = style.format_input({"instruction": "", "input": ""})
    return TurnLayout(head, style.response_header, end_text + head, style.response_header)


def chat_layout(style: ChatStyle) -> TurnLayout:
    """The chat template's fixed text around each message, from renders of one, three and five marker
    messages; each render must be those pieces around the markers, else the template is not one a Go template
    can copy (it changes a message's text, or its text depends on more than the message's place)."""
    user1, assistant1, user2, assistant2, user3 = MARKERS

    def render(*contents: str) -> str:
        roles = ("user", "assistant") * 3
        return style.render([{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)])

    one, three = render(user1), render(user1, assistant1, user2)
    pieces = _split(three, (user1, assistant1, user2))
    if pieces is None or not one.startswith(pieces[0] + user1):
        raise _not_fixed("the text around a user message changes, or a message's text is changed")
    layout = TurnLayout(pieces[0], pieces[1], pieces[2], pieces[3])
    if layout.render([{"role": "user", "content": user1}]) != one:
        raise _not_fixed("a one-message conversation ends otherwise than a longer one")
    five = [{"role": r, "content": c} for r, c in zip(("user", "assistant") * 3, MARKERS, strict=False)]
    if layout.render(five) != style.render(five):
        raise _not_fixed("the text between turns depends on more than the message's place")
    return layout


def _split(text: str, markers: tuple[str, ...]) -> list[str] | None:
    """``text`` cut at each marker (each occurring once, in order): the len(markers) + 1 pieces around them."""
    pieces, rest = [], text
    for marker in markers:
        if text.count(marker) != 1 or marker not in rest:
            return None
        before, _, rest = rest.partition(marker)
        pieces.append(before)
    return [*pieces, rest]


def _not_fixed(why: str) -> ConfigError:
    return ConfigError(
        f"the model's chat template cannot be written as an Ollama TEMPLATE (Go's text/template) that renders the "
        f"prompts the model was trained on: {why}"
    )
