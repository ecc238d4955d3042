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

func main() {
	var in struct { Template string `json:"template"`; Conversations [][]Message `json:"conversations"` }
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
	t, out := template.Must(template.New("TEMPLATE").Parse(in.Template)), []string{}
	for _, messages := range in.Conversations {
		var b strings.Builder
		data := struct{ Messages []Message; System, Prompt string }{Messages: messages}
		if err := t.Execute(&b, data); err != nil { panic(err) }
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def build_renderer(folder: Path) -> Path:
    """The program, built with ``go build`` (its caches inside ``folder``, nothing fetched)."""
    go = shutil.which("go") or "/usr/bin/go"
    (folder / "render.go").write_text(GO_PROGRAM)
    env = {**os.environ, "GOCACHE": str(folder / "gocache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off"}
    subprocess.run(
        [go, "build", "-o", str(folder / "render"), str(folder / "render.go")],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    return folder / "render"


def go_render(renderer: Path, template: str, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered by ``template`` through Go's text/template."""
    given = json.dumps({"template": template, "conversations": conversations})
    done = subprocess.run([str(renderer)], input=given, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def modelfile_template(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile, between its triple quotes, as Ollama's parser takes it."""
    found = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    assert found, modelfile
    return found.group(1)
