"""Go's own text/template, as Ollama renders a Modelfile's TEMPLATE: a ten-line Go program built with the
system's ``go`` (Debian's golang-go) into a test's folder, fed conversations as JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

GO_PROGRAM = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct { Role string `json:"role"`; Content string `json:"content"` }

// collated: Ollama's template.Execute hands a template the messages with consecutive ones of a role merged
// (a blank line between) and .System all system messages' text joined so.
func collated(messages []Message) (string, []*Message) {
	var system []string
	var merged []*Message
	for i := range messages {
		if messages[i].Role == "system" { system = append(system, messages[i].Content) }
		if n := len(merged); n > 0 && merged[n-1].Role == messages[i].Role {
			merged[n-1].Content += "\\n\\n" + messages[i].Content
		} else {
			merged = append(merged, &messages[i])
		}
	}
	return strings.Join(system, "\\n\\n"), merged
}

func main() {
	var in struct { Template string `json:"template"`; Conversations [][]Message `json:"conversations"` }
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	out := []map[string]string{}
	for _, messages := range in.Conversations {
		var b strings.Builder
		system, merged := collated(messages)
		data := map[string]any{"System": system, "Messages": merged, "Tools": nil, "Response": ""}
		if err := t.Execute(&b, data); err != nil {
			out = append(out, map[string]string{"error": err.Error()})
		} else {
			out = append(out, map[string]string{"text": b.String()})
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def build_renderer(folder: Path) -> Path:
    """The program, built with ``go build`` (its caches inside ``folder``, nothing fetched)."""
    return _go_build(folder, "render", GO_PROGRAM)


def build_modelfile_parser(folder: Path) -> Path:
    """Ollama's own Modelfile parser (``tests/ollama_modelfile_parser.go``), built as ``build_renderer``."""
    return _go_build(folder, "parse", (Path(__file__).parent / "ollama_modelfile_parser.go").read_text())


def _go_build(folder: Path, name: str, source: str) -> Path:
    go = shutil.which("go") or "/usr/bin/go"
    (folder / f"{name}.go").write_text(source)
    env = {**os.environ, "GOCACHE": str(folder / "gocache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off"}
    subprocess.run(
        [go, "build", "-o", str(folder / name), str(folder / f"{name}.go")],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    return folder / name


def read_modelfile(parser: Path, modelfile: str) -> dict:
    """A Modelfile as Ollama's parser reads it: ``{"commands": {name: text}}`` (the last of each name; a
    PARAMETER's name is its own), or ``{"error": ...}``."""
    done = subprocess.run([str(parser)], input=modelfile.encode(), capture_output=True, check=True, timeout=120)
    parsed = json.loads(done.stdout)
    if "commands" in parsed:
        return {"commands": {command["Name"]: command["Args"] for command in parsed["commands"]}}
    return parsed


def parse_modelfile(parser: Path, modelfile: str) -> dict[str, str]:
    """``read_modelfile``'s commands; the parser's error fails the test."""
    parsed = read_modelfile(parser, modelfile)
    assert "commands" in parsed, parsed
    return parsed["commands"]


def ollama_chat_messages(system: str, messages: list[dict]) -> list[dict]:
    """The messages Ollama's chat handler (server/routes.go) hands the TEMPLATE: a request's messages, after the
    Modelfile's SYSTEM as a system message where the request begins with none and SYSTEM is not empty."""
    if messages[0]["role"] != "system" and system != "":
        return [{"role": "system", "content": system}, *messages]
    return messages


def go_outcomes(renderer: Path, template: str, conversations: list[list[dict]]) -> list[dict]:
    """Each conversation rendered by ``template`` through Go's text/template as Ollama executes a TEMPLATE
    (its messages collated, ``.System`` their system text): ``{"text": ...}``, or ``{"error": ...}`` where the
    render fails."""
    given = json.dumps({"template": template, "conversations": conversations})
    done = subprocess.run([str(renderer)], input=given, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def go_render(renderer: Path, template: str, conversations: list[list[dict]]) -> list[str]:
    """Each conversation's text (each must render)."""
    outcomes = go_outcomes(renderer, template, conversations)
    assert all("text" in outcome for outcome in outcomes), outcomes
    return [outcome["text"] for outcome in outcomes]


def modelfile_template(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile, between its triple quotes, as Ollama's parser takes it."""
    found = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    assert found, modelfile
    return found.group(1)
