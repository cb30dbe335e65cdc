# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
# No GPU: the CPU build of torch (on this kind of machine it lies on local disk). With a GPU,
# set TORCH_SPEC=torch to take the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
ifeq ($(HAS_GPU),)
export DS_ACCELERATOR ?= cpu
endif
# DeepSpeed JIT-builds its CPU ops once into a private folder, so ranks never wait on each other's compiles.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m tnf_scale.ops
	touch $@

demo: install
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port 29611 tnf_scale/train.py --preset tiny --output_dir $(RUN_DIR) --overwrite true

test: install
	$(PY) -m pytest -q tests
