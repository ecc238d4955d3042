#!/usr/bin/env bash
# Installs sft-job into the active Python environment at the versions of requirements/lock.txt.
# The Dockerfile, .ci/run and the README's set-up commands all call this script, so the image, CI
# and a newcomer's venv run the same versions.
#
#   bash scripts/install.sh [--deps-only | --project-only] [--editable] [EXTRA[,EXTRA]]
#
# --deps-only     torch, then the dependencies of the project and the extras (the image's cached layer)
# --project-only  the project itself, without dependencies (after --deps-only)
# --editable      install the project with `pip install -e` (a working checkout)
# EXTRA           optional groups of pyproject.toml: tf (OpenAI's checkpoints), export (gguf, for sft-job
#                 export), test (with the book's own code from requirements/book.txt, and llama.cpp)
#
# torch goes first and alone, at the lock's version: pip takes the wheel it finds for this machine
# (the CUDA build from PyPI on Linux, a CPU wheel where pip is configured to find one) before
# anything that depends on torch could pull another build in.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/lock.txt
deps=1 project=1 editable="" extras=""
for arg in "$@"; do
  case "$arg" in
    --deps-only) project=0 ;;
    --project-only) deps=0 ;;
    --editable) editable="-e" ;;
    -*) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    *) extras="$arg" ;;
  esac
done

want=$(sed -n 's/.*--python-version \([0-9.]*\).*/\1/p' "$lock" | head -n 1)
have=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
  echo "install.sh: $lock is compiled for Python $want, this is Python $have" >&2
  exit 2
fi

pip=(python3 -m pip install --no-input --disable-pip-version-check)
# llama-cpp-python (the test extra) is an sdist that builds llama.cpp: for any x86-64 CPU, not only this one's
# instruction set (a wheel in pip's cache may serve another machine or the image); about 25 minutes on 2
# busy cores the first time, then pip's cache holds the wheel.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
if [ "$deps" = 1 ]; then
  "${pip[@]}" -c "$lock" "$(grep -E '^torch==' "$lock" | cut -d' ' -f1)"
  # The project's requirements (and those of the extras, self-references expanded), read from
  # pyproject.toml, so the dependencies install without the project's code (a cacheable layer).
  mapfile -t requirements < <(python3 - "$extras" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted, seen, out = [e for e in sys.argv[1].split(",") if e], set(), list(project["dependencies"])
while wanted:
    extra = wanted.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for req in project["optional-dependencies"][extra]:
        own = re.fullmatch(rf"{project['name']}\[(.+)\]", req)
        if own:
            wanted += own.group(1).split(",")
        else:
            out.append(req)
print("\n".join(out))
PY
  )
  "${pip[@]}" -c "$lock" "${requirements[@]}"
  if [[ ",$extras," == *,test,* ]]; then  # the book's code for the parity tests; see the file
    "${pip[@]}" --no-deps --require-hashes -r requirements/book.txt
  fi
fi
if [ "$project" = 1 ]; then
  "${pip[@]}" --no-deps $editable ".${extras:+[$extras]}"
fi
