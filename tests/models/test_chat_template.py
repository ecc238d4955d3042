"""``--prompt-style chat``: a model's own chat template rendered as ``transformers``' ``apply_chat_template``
renders it (checked on any text Hypothesis writes, Jinja syntax included), in a sandbox a downloaded
template cannot leave, and refused in one line where the model has none."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.core.errors import ConfigError, ExitCode
from job.data.instructions import ChatStyle, prompt_style
from job.models.chat_template import ChatTemplateError
from job.models.tokenizer import load_hf_tokenizer
from tests.family_folders import END, PAD, write_tokenizer
from tests.helpers import cli

# The shapes of the two families' templates, written here: ChatML's turns with a default system turn, a
# namespace and a reversed loop (Qwen's), and a header per turn after bos_token, a date, tojson and
# raise_exception (Llama 3's).
CHATML = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages[::-1] %}{%- if ns.last_user < 0 and message.role == 'user' %}"
    "{%- set ns.last_user = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + strftime_now('%d %b %Y')[:0] + 'x' }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role not in ['user', 'assistant'] %}{{- raise_exception('roles are user and assistant') }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{{- {'n': loop.index} | tojson if false else '' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, book_data):
    path = tmp_path_factory.mktemp("chat")
    write_tokenizer(path, book_data[:50])
    return path


def _with_template(folder, template) -> None:
    config = {"eos_token": END, "pad_token": PAD, "bos_token": "<|begin_of_text|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["{{ 7 * 7 }}", "{% raise %}", "  padded  ", "<|im_end|>", "\\n\\n", ""]
)


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=TEXT, entry_input=TEXT)
def test_the_prompt_is_transformers_apply_chat_template_for_any_text(folder, template, instruction, entry_input):
    from transformers import AutoTokenizer

    _with_template(folder, template)
    style = prompt_style("chat", load_hf_tokenizer(folder))
    entry = {"instruction": instruction, "input": entry_input, "output": "ok"}
    content = instruction + (f"\n\n{entry_input}" if entry_input else "")
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(style, ChatStyle) and style.format_input(entry) == theirs
    assert style.format_example(entry) == theirs + "ok"  # the response right after the generation prompt
    assert style.extract_response(theirs + " ok \n", theirs) == "ok"


def test_a_template_that_reaches_for_python_objects_or_does_not_compile_is_one_line(folder):
    entry = {"instruction": "Say hi.", "input": "", "output": "hi"}
    for template, why in ((ESCAPE, "fails to render"), ("{% for %}", "does not compile")):
        _with_template(folder, template)
        tokenizer = load_hf_tokenizer(folder)  # a broken template matters to --prompt-style chat only
        with pytest.raises(ChatTemplateError, match=f"tokenizer_config.json: chat_template {why}") as raised:
            prompt_style("chat", tokenizer).format_input(entry)
        assert "\n" not in str(raised.value)


def test_a_model_without_a_template_is_refused_at_preflight_naming_the_flag(folder, tmp_path):
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": END}))
    with pytest.raises(ConfigError, match="--prompt-style chat needs the model's chat template"):
        prompt_style("chat", load_hf_tokenizer(folder))
    result = cli("run", "--smoke", "--skip-judge", "--prompt-style", "chat", "--output", tmp_path, "--cache", tmp_path)
    assert result.returncode == ExitCode.BAD_CONFIG
    assert result.stderr.strip().splitlines()[-1].endswith("use --prompt-style alpaca or phi3")
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*/manifest.json"))
