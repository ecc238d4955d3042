"""The prompt a model was trained on as a runtime's chat template: an Ollama ``TEMPLATE`` (Go's text/template)
and a GGUF ``tokenizer.chat_template`` (Jinja), both from one ``TurnLayout``: the fixed text between messages,
by the roles on either side, read off the prompt style (Alpaca, Phi-3) or, for ``chat``, off the model's own
template rendered around marker messages (a template whose text around a message is not fixed is refused,
exit 2)."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

from job.core.errors import ConfigError
from job.data.instructions import ChatStyle, PromptStyle
from job.models.chat_template import ChatTemplateError

START = ""
"""The role "before" the first message."""
# The conversations a chat template is read from (each message's content a marker), and then checked against.
PROBES = (
    ("user",),
    ("user", "assistant", "user"),
    ("system", "user"),
    ("system", "user", "assistant", "user"),
    ("user", "assistant", "system", "user"),
    ("system",),
)
# Conversations ending in the assistant's message: where the template renders these with the same pieces as the
# others, the layout renders them too (else, as Qwen3's adds a thinking block to a last answer, they are refused).
ENDING_IN_ANSWER = (("user", "assistant"), ("system", "user", "assistant"))
CHECKS = (("user", "assistant") * 2 + ("user",), ("system",) + ("user", "assistant") * 3 + ("user",))
ROLES_READ = ("system", "user", "assistant")
UNRENDERED = (
    "sft-job export: this model was not trained on a conversation like this one (its TEMPLATE renders a system "
    "message first, then user and assistant turns in turn, as the model's own chat template does)"
)
"""What Ollama answers for a conversation the trained layout has no text for (Go's text/template has no way to
raise: the TEMPLATE calls a template of this name, which is not defined, so the render fails naming it)."""


def _marked(roles: tuple[str, ...]) -> list[dict]:
    """A conversation of ``roles`` whose contents are words no template writes itself."""
    return [{"role": role, "content": f"QX{role.upper()}{i}QX"} for i, role in enumerate(roles)]


def _transitions(roles: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (before, role) pairs a conversation of ``roles`` passes, the last one (role, "") its end."""
    return list(zip((START, *roles), (*roles, START), strict=True))


@dataclass(frozen=True)
class TurnLayout:
    """A conversation as text: before each message, ``between[(previous role, role)]`` (previous role ``START``
    for the first message); after the last, ``after[its role]`` (the generation prompt). A pair the layout lacks
    is a conversation the trained layout does not render (the model's template refuses it): the runtime's
    templates refuse it too, rather than render it some other way. An empty conversation renders nothing."""

    between: dict[tuple[str, str], str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    caveats: tuple[str, ...] = ()
    """Where the runtimes' rendering differs from the model's template in ways no marker shows (said, not fixed)."""

    @property
    def first(self) -> str:
        """Before the first user message."""
        return self.between[(START, "user")]

    @property
    def reply(self) -> str:
        """Between a user message and the assistant's answer to it."""
        return self.between[("user", "assistant")]

    @property
    def next(self) -> str:
        """Between an assistant's answer and the next user message."""
        return self.between[("assistant", "user")]

    @property
    def generation(self) -> str:
        """After the last user message: what the model answers after."""
        return self.after["user"]

    def render(self, messages: list[dict]) -> str:
        """The text of a conversation (with its generation prompt), as both runtime templates render it; a
        conversation the layout has no text for is a ``ConfigError``."""
        parts, previous = [], START
        for message in messages:
            parts += [self._piece(self.between, (previous, message["role"])), message["content"]]
            previous = message["role"]
        if previous != START:
            parts.append(self._piece(self.after, previous))
        return "".join(parts)

    @staticmethod
    def _piece(table: dict, key) -> str:
        if key not in table:
            raise ConfigError(UNRENDERED)
        return table[key]

    def go_template(self) -> str:
        """Ollama's ``TEMPLATE``: the same text from ``.Messages``, in which Ollama passes every message, system
        ones included (its ``.System`` and a Modelfile's or request's system prompt arrive there as a leading
        system message; consecutive messages of one role arrive merged). Every fixed piece is a Go string
        literal (JSON's escapes are Go's), so no text of the model's can read as template syntax, nor close the
        Modelfile's triple quotes."""
        refuse = f"{{{{ template {_go_quoted(UNRENDERED)} }}}}"
        branches = [
            f"if and (eq $prev {_go_quoted(before)}) (eq .Role {_go_quoted(role)}) }}}}{{{{ {_go_quoted(text)} }}}}"
            for (before, role), text in self.between.items()
        ]
        ends = [f"if eq $prev {_go_quoted(role)} }}}}{{{{ {_go_quoted(text)} }}}}" for role, text in self.after.items()]
        return (
            '{{- $prev := "" }}{{- range .Messages }}{{- '
            + "{{- else ".join(branches)
            + f"{{{{- else }}}}{refuse}{{{{- end }}}}{{{{ .Content }}}}{{{{ $prev = .Role }}}}{{{{- end }}}}"
            + '{{- if eq $prev "" }}{{- else '
            + "{{- else ".join(ends)
            + f"{{{{- else }}}}{refuse}{{{{- end }}}}"
        )

    def jinja_template(self) -> str:
        """GGUF's ``tokenizer.chat_template`` for a prompt style: the same text from ``messages``
        (``raise_exception`` where the layout has none)."""
        refuse = f"{{{{ raise_exception({_quoted(UNRENDERED)}) }}}}"
        branches = [
            f"if ns.prev == {_quoted(before)} and message['role'] == {_quoted(role)} %}}{{{{ {_quoted(text)} }}}}"
            for (before, role), text in self.between.items()
        ]
        ends = [f"if ns.prev == {_quoted(role)} %}}{{{{ {_quoted(text)} }}}}" for role, text in self.after.items()]
        return (
            "{%- set ns = namespace(prev='') %}{%- for message in messages %}{%- "
            + "{%- el".join(branches)
            + f"{{%- else %}}{refuse}{{%- endif %}}{{{{ message['content'] }}}}{{%- set ns.prev = message['role'] %}}"
            + "{%- endfor %}{%- if add_generation_prompt and ns.prev != '' %}{%- "
            + "{%- el".join(ends)
            + f"{{%- else %}}{refuse}{{%- endif %}}{{%- endif %}}"
        )


def _quoted(text: str) -> str:
    """``text`` as a double-quoted literal that Go and Jinja read back alike (non-ASCII kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def dropped_by_modelfile_parser(char: str) -> bool:
    """Whether Ollama's Modelfile parser (parser/parser.go) drops ``char``: every rune Go's ``strconv.IsPrint``
    rejects (not a letter, mark, number, punctuation, symbol or ASCII space) but tab, CR and LF."""
    return char not in "\t\r\n " and unicodedata.category(char)[0] not in "LMNPS"


def _go_quoted(text: str) -> str:
    """``_quoted`` for a TEMPLATE in a Modelfile: a rune the parser would drop (a no-break or zero-width space,
    a line separator) is written as Go's escape of it, so the template holds it as the model's does."""
    return "".join(_go_escape(c) if dropped_by_modelfile_parser(c) else c for c in _quoted(text))


def _go_escape(char: str) -> str:
    return f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}"


def entry_message(style: PromptStyle, entry: dict) -> str:
    """What a user types for ``entry`` so that the layout renders the style's prompt: the prompt less its fixed
    head (the instruction, and the input as the style lays it out: Alpaca's ``\\n\\n### Input:\\n``)."""
    if isinstance(style, ChatStyle):
        return entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
    head = style.format_input({"instruction": "", "input": ""})
    return style.format_input(entry)[len(head) :]


def turn_layout(style: PromptStyle, end_text: str) -> TurnLayout:
    """The layout of ``style``: the prompt's head, the response header after each user message, the end token
    after each answer; for ``chat``, read off the model's template (``chat_layout``). Alpaca and Phi-3 were
    trained on no system message: one (first) is written before the prompt as trained, a blank line after it,
    so everything after it is the trained prompt byte for byte."""
    if isinstance(style, ChatStyle):
        return chat_layout(style)
    head = style.format_input({"instruction": "", "input": ""})
    between = {
        (START, "user"): head,
        ("user", "assistant"): style.response_header,
        ("assistant", "user"): end_text + head,
        (START, "system"): "",
        ("system", "user"): "\n\n" + head,
    }
    return TurnLayout(between, {"user": style.response_header})


def chat_layout(style: ChatStyle) -> TurnLayout:
    """The chat template's fixed text between messages, from renders of marker conversations (``PROBES``); a
    conversation the template refuses (``raise_exception``) leaves its pairs out, so the runtimes refuse it too.
    Each render must be fixed pieces around the markers, the same for the same pair of roles in every render,
    and the layout must then render ``CHECKS`` as the template does, else no Go template can copy it (it changes
    a message's text, or its text depends on more than the roles either side)."""
    between: dict[tuple[str, str], str] = {}
    after: dict[str, str] = {}
    for roles in PROBES:
        messages = _marked(roles)
        try:
            text = style.render(messages)
        except ChatTemplateError:
            if roles == PROBES[0]:
                raise  # a template that renders no one-message conversation (or does not compile) says why
            continue
        pieces = _split(text, tuple(m["content"] for m in messages))
        if pieces is None:
            raise _not_fixed("the text around a message changes, or a message's text is changed")
        for (before, role), piece in zip(_transitions(roles), pieces, strict=True):
            table, key = (after, before) if role == START else (between, (before, role))
            if table.setdefault(key, piece) != piece:
                raise _not_fixed(
                    "the text between turns depends on more than the message's place (the roles either side)"
                )
    after |= _answer_end(style, between)
    layout = TurnLayout(between, after, _content_caveats(style) + _empty_caveats(style, between, after))
    if ("user", "assistant") not in between or ("assistant", "user") not in between:
        raise _not_fixed("it renders no conversation of user and assistant turns in turn")
    for roles in CHECKS:
        if _rendered(layout.render, _marked(roles)) != _rendered(style.render, _marked(roles)):
            raise _not_fixed("the text between turns depends on more than the message's place (the roles either side)")
    return layout


# Texts around a marker that some templates change (Llama 3 trims each message; Qwen3 reads what ends in </think>
# as reasoning), each with what the caveat says.
CHANGED_TEXTS = (
    (" \n{}\n ", "changes the whitespace around a message's text (trims it)"),
    ("{}</think>", "changes a message holding </think> (as reasoning, Qwen3's)"),
)


def _answer_end(style: ChatStyle, between: dict) -> dict[str, str]:
    """``after["assistant"]`` where every conversation of ``ENDING_IN_ANSWER`` the template renders has the
    layout's pieces and one text after the answer; else nothing (those conversations are refused)."""
    ends = set()
    for roles in ENDING_IN_ANSWER:
        messages = _marked(roles)
        text = _rendered(style.render, messages)
        pieces = None if text is None else _split(text, tuple(m["content"] for m in messages))
        if pieces is None:
            continue
        if any(between.get(key) != piece for key, piece in zip(_transitions(roles)[:-1], pieces, strict=False)):
            return {}
        ends.add(pieces[-1])
    return {"assistant": ends.pop()} if len(ends) == 1 else {}


def _content_caveats(style: ChatStyle) -> tuple[str, ...]:
    """What the template does to a message's text that Go's text/template (and Ollama's functions) cannot: the
    TEMPLATE passes a message's text as is, so such a message renders otherwise."""
    caveats = []
    for wrap, why in CHANGED_TEXTS:
        for roles in (("system", "user", "assistant", "user"), ("user", "assistant", "user")):
            messages = [m | {"content": wrap.format(m["content"])} for m in _marked(roles)]
            text = _rendered(style.render, messages)
            if text is not None:
                if not all(m["content"] in text for m in messages):
                    caveats.append(
                        f"the model's chat template {why}, which the TEMPLATE cannot: it passes the text as is"
                    )
                break
    return tuple(caveats)


def _empty_caveats(style: ChatStyle, between: dict, after: dict) -> tuple[str, ...]:
    """A template may write an empty message otherwise than its fixed pieces (skip an empty system turn, or a
    separator only before a non-empty text); a Go TEMPLATE writes the pieces alike, so where any role's empty
    message renders otherwise, say so."""
    layout, odd = TurnLayout(between, after), []
    for role in ROLES_READ:
        for roles in CHECKS:
            messages = [m | {"content": ""} if m["role"] == role else m for m in _marked(roles)]
            if role not in odd and _rendered(layout.render, messages) != _rendered(style.render, messages):
                odd.append(role)
    if not odd:
        return ()
    return (
        f"the model's chat template writes an empty {' or '.join(odd)} message otherwise than one with text, which "
        "the TEMPLATE does not follow: it writes the same text around an empty message",
    )


def _rendered(render, messages: list[dict]) -> str | None:
    """What ``render`` makes of ``messages``; None where it refuses them."""
    try:
        return render(messages)
    except (ChatTemplateError, ConfigError):
        return None


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
