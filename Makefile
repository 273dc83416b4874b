# twingpt: every target a user runs. The first target that needs Python builds .venv from nothing.
#   make train         train the default preset on the default dataset with the faster backend here
#   make test          the whole test suite
#   make data          build the default dataset (Python's stdlib sources) and its tokenizer
#   make data-fineweb  download the Parameter Golf FineWeb export (VARIANT=sp1024 TRAIN_SHARDS=1)
#   make train-cpu     torch on the CPU        make train-cuda   torch on CUDA (NPROC=8 for 8 GPUs)
#   make train-mlx     MLX (Metal on a Mac, its CPU backend on Linux; NPROC=2 or HOSTFILE=hosts.json: several processes)
#   make sample        continue PROMPT="..." with a checkpoint (CHECKPOINT=..., BACKEND=torch|mlx)
#   make eval          val_loss/val_bpb of CHECKPOINT=... or ARTIFACT=... (EVAL_STRIDE=64: sliding windows; TTT_ENABLED=1: test-time training)
#   make quantize      re-quantize CHECKPOINT=... (QUANT=gptq MATRIX_BITS=6 COMPRESSOR=brotli ...): bytes, budget, round-trip val_bpb
#   make check-submission  the challenge's rules this tool can check, for RUN=runs/<id> (or a log.txt): a verdict table
#   make parity        the cross-backend parity suite and its table
#   make bench         tokens/s, step time, MFU and memory of both backends here; ops, syncs, recompiles of a torch step
#   make ablate       the make-train preset with each technique of the record alone and all together, both backends
#   make ablate-tying  the make-train preset tied and untied, side by side (ABLATE_MATCH_PARAMS=1: + matched)
#   make analyze-tying the direct path of CHECKPOINT=... (symmetry, bigram bits, what tying saves)
#   make doctor        versions, devices, BLAS, memory, §10 checks and speed here (runs/doctor.json)
#   make pg-import     a Parameter Golf reference file (SRC=final_model.pt, ...) as a checkpoint (OUT=...)
#   make pg-export     a checkpoint (CHECKPOINT=...) as train_gpt.py's state dict (OUT=final_model.pt)
#   make mutants       one-line bugs, each in a copy of the code, and the tests that catch them (MUTANTS=core-3,data-1)
# Settings pass through as environment variables (NUM_LAYERS=4 make train-cpu) or ARGS="--num-layers 4".

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
NPROC  ?= 1
VARIANT ?= sp1024
TRAIN_SHARDS ?= 1
FINEWEB_DIR := data/datasets/fineweb10B_sp1024

# The preset of `make train`: a real model that trains in about 5 minutes on a 2-core laptop CPU,
# capped at 6 minutes of training on slower machines (the learning rate then warms down by time).
# Validation in batches of 65,536 tokens, not the reference's 524,288: the same figures, an eighth of
# the memory (torch scores a whole batch at once: 6.5 GiB estimated at 524,288, 0.8 GiB at 65,536).
TRAIN_PRESET := ITERATIONS=$${ITERATIONS:-500} MODEL_DIM=$${MODEL_DIM:-128} NUM_LAYERS=$${NUM_LAYERS:-4} \
  NUM_HEADS=$${NUM_HEADS:-4} NUM_KV_HEADS=$${NUM_KV_HEADS:-2} TRAIN_SEQ_LEN=$${TRAIN_SEQ_LEN:-256} \
  TRAIN_BATCH_TOKENS=$${TRAIN_BATCH_TOKENS:-8192} VAL_BATCH_SIZE=$${VAL_BATCH_SIZE:-65536} \
  VAL_LOSS_EVERY=$${VAL_LOSS_EVERY:-100} \
  TRAIN_LOG_EVERY=$${TRAIN_LOG_EVERY:-25} WARMDOWN_ITERS=$${WARMDOWN_ITERS:-150} \
  CHECKPOINT_EVERY=$${CHECKPOINT_EVERY:-100} MAX_WALLCLOCK_SECONDS=$${MAX_WALLCLOCK_SECONDS:-360}

.PHONY: help venv blas lrzip test data data-fineweb default-data train train-cpu train-cuda train-mlx sample eval quantize check-submission clean-venv parity bench doctor ablate-tying ablate analyze-tying pg-import pg-export mutants

help:
	@sed -n '/^[^#]/q;p' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[torch,mlx,dev,tracking]"
	@$(MAKE) --no-print-directory blas lrzip
	@touch $(STAMP)

# MLX's Linux wheel ships a reference BLAS ~30x slower than OpenBLAS; the MLX trainer preloads
# Debian's OpenBLAS when it is installed. As root we install it; otherwise we say how.
blas:
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing OpenBLAS for MLX's CPU backend: apt-get install libopenblas0-pthread"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq libopenblas0-pthread || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; }; } >/dev/null 2>&1 \
	      || echo "warning: could not install OpenBLAS; MLX on the CPU will be slow"; \
	  else \
	    echo "note: MLX on the CPU is ~30x faster with OpenBLAS: sudo apt-get install libopenblas0-pthread"; \
	  fi; \
	fi

# COMPRESSOR=pergroup compresses the artifact's integer codes with the lrzip program (its ZPAQ
# back end). As root we install Debian's; otherwise we say how. `make test` needs it.
lrzip:
	@if ! command -v lrzip >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing lrzip for COMPRESSOR=pergroup: apt-get install lrzip"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq lrzip || { apt-get update -qq && apt-get install -y -qq lrzip; }; } >/dev/null 2>&1 \
	      || echo "warning: could not install lrzip; COMPRESSOR=pergroup will refuse to run"; \
	  else \
	    echo "note: COMPRESSOR=pergroup needs lrzip: sudo apt-get install lrzip (brew install lrzip on a Mac)"; \
	  fi; \
	fi

venv: $(STAMP)

test: $(STAMP) lrzip
	$(PY) -m pytest -q

data: $(STAMP)
	$(PY) -m data.build_default

data-fineweb: $(STAMP)
	$(PY) -m data.fineweb --variant $(VARIANT) --train-shards $(TRAIN_SHARDS)

# The trainers read FineWeb when it is there, else the default dataset, which is built if missing.
default-data: $(STAMP)
	@if [ -z "$$DATA_PATH" ] && [ ! -d $(FINEWEB_DIR) ]; then $(PY) -m data.build_default; fi

# The backend: torch with CUDA, MLX on Apple silicon, else the faster of the two here (measured once).
train: default-data
	@backend=$${BACKEND:-$$($(PY) -m commands.pick_backend)} && \
	  echo "$(TRAIN_PRESET) $(PY) -m backend_$$backend.train $(ARGS)" && \
	  $(TRAIN_PRESET) $(PY) -m backend_$$backend.train $(ARGS)

train-cpu: default-data
	DEVICE=cpu $(PY) -m backend_torch.train $(ARGS)

# CUDA is checked first: a machine without it hears so before any dataset is built.
train-cuda: $(STAMP)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: make train-cuda: CUDA is not available on this machine (torch ' + torch.__version__ + '); use make train-cpu, or make train-mlx on a Mac')"
	@$(MAKE) --no-print-directory default-data
	@if [ "$(NPROC)" = "1" ]; then \
	  DEVICE=cuda $(PY) -m backend_torch.train $(ARGS); \
	else \
	  DEVICE=cuda $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m backend_torch.train $(ARGS); \
	fi

# NPROC=2: that many local processes under mlx.launch (mx.distributed's ring backend on 127.0.0.1,
# ports MLX_PORT, MLX_PORT+1, ...); HOSTFILE=hosts.json: one process per host of an mlx.launch
# hostfile (README: "Several Macs"). Each rank reads its share of every batch; rank 0 alone writes.
MLX_PORT ?= 32323
# Local ranks: mlx.launch runs with Ctrl-C ignored (it hangs after a Ctrl-C of its own), while the
# ranks take Ctrl-C back (backend_mlx/distributed.py), finish the step, write the checkpoint and stop.
train-mlx: default-data
	@if [ -n "$(HOSTFILE)" ]; then \
	  $(VENV)/bin/mlx.launch --backend ring --hostfile "$(HOSTFILE)" --starting-port $(MLX_PORT) -- $(PY) -m backend_mlx.train $(ARGS); \
	elif [ "$(NPROC)" = "1" ]; then \
	  $(PY) -m backend_mlx.train $(ARGS); \
	else trap '' INT; \
	  $(VENV)/bin/mlx.launch --backend ring -n $(NPROC) --starting-port $(MLX_PORT) -- $(PY) -m backend_mlx.train $(ARGS); \
	fi

clean-venv:
	rm -rf $(VENV)

# Continue a prompt with a checkpoint (either backend's), in either backend:
#   make sample CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors PROMPT="def main(" [BACKEND=mlx]
# Greedy by default; TEMPERATURE=0.8 TOP_K=40 SEED=1 to sample; MAX_NEW_TOKENS=200; TOKENIZER_PATH=...
# CHECKPOINT, PROMPT and the rest reach the program as environment variables, so any text can be quoted.
BACKEND ?= torch
sample: $(STAMP)
	@case "$(BACKEND)" in torch|mlx) ;; *) echo "error: BACKEND=$(BACKEND): must be torch or mlx" >&2; exit 2;; esac
	$(PY) -m backend_$(BACKEND).sample $(ARGS)

# Evaluate a model file without training, in either backend (trainer/eval_file.py): one line with
# val_loss and val_bpb; nothing written unless OUT=figures.json. Unset settings are the file's run's.
#   make eval CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [EVAL_STRIDE=64] [BACKEND=mlx]
#   make eval ARTIFACT=runs/<run>/model.int8.zlib [DATA_PATH=... TOKENIZER_PATH=...] [OUT=eval.json]
eval: $(STAMP)
	@case "$(BACKEND)" in torch|mlx) ;; *) echo "error: BACKEND=$(BACKEND): must be torch or mlx" >&2; exit 2;; esac
	$(PY) -m backend_$(BACKEND).eval $(ARGS)

# Re-quantize a checkpoint without training (trainer/quantize_file.py): the artifact's bytes, the budget
# line (artifact + code) and the round-trip val_bpb; nothing written unless OUT=path.
#   make quantize CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors QUANT=gptq COMPRESSOR=brotli [OUT=model.gptq.brotli]
quantize: $(STAMP)
	@case "$(BACKEND)" in torch|mlx) ;; *) echo "error: BACKEND=$(BACKEND): must be torch or mlx" >&2; exit 2;; esac
	$(PY) -m backend_$(BACKEND).quantize $(ARGS)

# The Parameter Golf rules a run's log can prove (trainer/check_submission.py): training and evaluation
# time within their caps, artifact + code bytes under 16,000,000, and the TTT evaluation's own
# legality record. Exit 0 when all hold, 1 when one fails.
#   make check-submission RUN=runs/<id>     (or RUN=path/to/log.txt; TRAIN_CAP_SECONDS=, EVAL_CAP_SECONDS=)
check-submission: $(STAMP)
	$(PY) -m trainer.check_submission $(ARGS)

parity: $(STAMP) lrzip
	$(PY) -m pytest -q tests/parity

# Training throughput of both backends on this machine: tokens/s, MFU and peak memory of a full
# train step for a small config and the reference one; prints a table, writes bench/results.json.
# Then the launch-bound costs of the torch step (aten ops, host syncs, recompiles; bench/launches.json).
#   make bench ARGS="--configs base --settings torch-bf16,mlx-fp32-openblas"
bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)
	$(PY) -m bench.launches --out bench/launches.json

# Mutation testing (commands/mutants.py): each one-line mutant of commands/mutants_list.py is applied to a
# fresh copy of the source tree and its few test files run there; prints a table and the kill rate,
# exit 1 on a survivor or a stale mutant. Not part of `make test` (10 minutes on a busy 2-core machine).
#   make mutants MUTANTS=core-3,data-1     a subset
mutants: $(STAMP)
	$(PY) -m commands.mutants $(ARGS)

# For a new machine or a bug report, in under a minute: versions, devices, BLAS, the memory budget,
# docs/spec.md §10's checks on every device and a few timed steps of the make-train model per backend.
# Prints a verdict (exit 1 on a problem) and writes runs/doctor.json: attach it to a bug report.
doctor: $(STAMP)
	$(PY) -m commands.doctor $(ARGS)

# Each technique of the record (PRESET=record-1.0611) alone, then all together, in torch and MLX:
# runs/$${ABLATE_ID:-ablate}/<backend>-<technique>/, finished runs reused; a table, ablation.png and
# ablation.json (commands/ablate.py; ABLATE_TECHNIQUES=ema,weight-decay and ABLATE_BACKENDS=torch choose).
ablate: default-data
	$(TRAIN_PRESET) $(PY) -m commands.ablate $(ARGS)

# The tying tradeoff: the make-train preset (any setting passes through) trained tied and untied with
# one backend (BACKEND=, else the one make train picks), same seed, data and steps; finished runs in
# runs/$${ABLATE_ID:-ablate-tying}/ are reused. A table, loss.png and ablation.json.
ablate-tying: default-data
	@backend=$${BACKEND:-$$($(PY) -m commands.pick_backend)} && \
	  $(TRAIN_PRESET) BACKEND=$$backend $(PY) -m commands.ablate_tying $(ARGS)

# The direct-path analysis of a checkpoint (trainer/tying.py): embedding -> final norm -> head, every
# block skipped, scored on the val bigrams against the train unigram and bigram models; the symmetry
# of W_E*W_U^T and of the data's bigram table; what tying saves. Prints a table, writes
# runs/<id>/tying.json (OUT=path elsewhere):
#   make analyze-tying CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [DATA_PATH=... TOKENIZER_PATH=...]
# CHECKPOINT and the rest reach the program as environment variables, as with make sample.
analyze-tying: $(STAMP)
	$(PY) -m trainer.tying $(ARGS)

# The Parameter Golf reference trainers' files (interop/): import any of final_model.pt,
# final_model.int8.ptz, <run>_mlx_model.npz, <run>_mlx_model.int8.ptz as a weights-only checkpoint,
# and export a checkpoint as the final_model.pt train_gpt.py loads (RoPE and dtypes converted):
#   make pg-import SRC=final_model.int8.ptz OUT=runs/imported/step_000000.safetensors
#   make pg-export CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors OUT=final_model.pt
# SRC, OUT, CHECKPOINT and the rest reach the program as environment variables.
pg-import: $(STAMP)
	$(PY) -m interop.pg_import $(ARGS)

pg-export: $(STAMP)
	$(PY) -m interop.pg_export $(ARGS)
