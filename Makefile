# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
BENCH_DIR ?= runs/bench
# make bench OVERWRITE=true replaces the runs of an earlier bench (without it, the bench refuses to)
OVERWRITE ?= false
# The torch the suite runs with, on every node: PyPI's wheel of it is the CUDA build (on a machine without a GPU
# here, a CPU build of the same version lies on local disk).
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),)
export DS_ACCELERATOR ?= cpu
endif
# DeepSpeed JIT-builds its CPU ops once into a private folder, so ranks never wait on each other's compiles.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# The cluster tests drive real pdsh + sshd, SLURM (slurmctld, slurmd, munge) and OpenMPI on this host.
CLUSTER_BINS := pdsh /usr/sbin/sshd slurmctld slurmd munged mpirun
CLUSTER_PKGS := pdsh openssh-server openssh-client slurm-wlm munge openmpi-bin libopenmpi-dev

.PHONY: demo bench test test-slow install cluster-deps lint bytecode
install: $(VENV)/.installed

cluster-deps:
	@missing=; for b in $(CLUSTER_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "missing$$missing: the cluster tests will be skipped (installing them needs root and apt-get)"; exit 0; fi; \
	echo "installing$$missing (Debian: $(CLUSTER_PKGS))"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLUSTER_PKGS) >/dev/null

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,mpi]"
	$(PY) -m tnf_scale.ops
	$(PY) -m tnf_scale.finetune.shipped
	touch $@

demo: install bytecode
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port 29611 tnf_scale/train.py --preset tiny --output_dir $(RUN_DIR) --overwrite true

# Baseline and TNF side by side on the bundled corpus, plus the Hugging Face Trainer peer, and time to score
# (every quarter-run checkpoint fine-tuned on the shipped task, 3 seeds); the reports are copied to
# tools/results/, which the README's Results section shows.
bench: install
	$(VENV)/bin/tnf-bench --out $(BENCH_DIR) --overwrite $(OVERWRITE)
	mkdir -p tools/results
	cp $(addprefix $(BENCH_DIR)/,report.md time_to_loss.png time_to_loss.json downstream.png downstream.json throughput.json throughput.png) tools/results/

# The whole suite but the BERT-large-sized test, within 15 minutes here set-up included.
test: cluster-deps install lint bytecode
	$(PY) -m pytest -q tests -m "not slow" --durations=15

# The project's own modules compiled to bytecode: where PYTHONDONTWRITEBYTECODE is set, every process (each rank of
# every launch) would compile them again, about 1.2 s each here. Python recompiles a module whose source changed.
bytecode: install
	$(PY) -m compileall -q tnf_scale tools tests

# ruff's formatter and linter, configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test-slow: install bytecode
	$(PY) -m pytest -q tests -m slow
