# Two commands from a fresh clone:  `make demo` (train the prefix on the built-in tiny default)  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo sample test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# Train an `alz` prefix on the random-weight tiny model with the shipped people/templates/prompts files and
# self-generated general samples, then draw with and without it. Outputs in outputs/demo/.
demo: $(STAMP)
	$(PY) dataset_generation.py --config_path configs/tiny/tiny-sd.yaml --names "Tom Hanks" "Emma Watson" \
		--n_samples 4 --steps 10 --outdir outputs/demo/faces
	$(PY) train.py --config_path configs/tiny/tiny-sd.yaml --face_dir outputs/demo/faces \
		--outdir outputs/demo --iterations 60 --batch_size 4 --image_size 64 --ddim_steps 10 \
		--max_general 24 --save_every 30
	$(PY) sample.py --config_path configs/tiny/tiny-sd.yaml --embedding outputs/demo/embeddings/APL-60.pt \
		--prompt "alz A close-up portrait of Tom Hanks" --prompt "A close-up portrait of Tom Hanks" \
		--n_samples 2 --steps 10 --outdir outputs/demo/samples

sample: $(STAMP)
	$(PY) sample.py --config_path configs/tiny/tiny-sd.yaml --n_samples 2 --steps 10 --outdir outputs/tiny-samples

test: $(STAMP)
	$(PY) -m pytest -q --timeout 900

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench.py --size tiny --device cpu

clean:
	rm -rf outputs .pytest_cache
