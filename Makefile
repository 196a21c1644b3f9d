# Two commands from a fresh clone:  `make demo` (train the prefix on the built-in toy model)  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo sample test test-fast lint bench toy-experiment clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The toy world (toyworld/, README "Toy world"): a small SD v1-architecture model this repository trained to draw
# 16 named toy people. Make a face set with it, train the prefix on it, and measure with the toy recogniser.
TOY := --config_path configs/toy/toy-sd.yaml --ckpt_path toyworld/assets/toy-sd.safetensors
TOY_PEOPLE := --people_file toyworld/data/toy_people.tsv
DEMO := outputs/demo
demo: $(STAMP)
	$(PY) -m toyworld.references --outdir $(DEMO)/references --n 4
	$(PY) dataset_generation.py $(TOY) $(TOY_PEOPLE) --templates_file toyworld/data/toy_templates.txt \
		--n_samples 12 --negative_prompt "" --outdir $(DEMO)/faces
	$(PY) train.py $(TOY) $(TOY_PEOPLE) --templates_file toyworld/data/toy_templates.txt \
		--prompts_file toyworld/data/toy_prompts.txt --face_dir $(DEMO)/faces --image_size 64 --start_guidance 7 \
		--ddim_steps 20 --iterations 300 --batch_size 16 --lr 3e-2 --save_every 100 --log_every 10 --outdir $(DEMO) \
		--start_over
	$(PY) test_id.py $(TOY) $(TOY_PEOPLE) --embedding $(DEMO)/embeddings/APL-300.pt --mode both \
		--face_backend toyworld.perception:ToyFaceBackend --gt_folder $(DEMO)/references --n_samples 4 \
		--negative_prompt "" --outdir $(DEMO)/test_id
	$(PY) -m toyworld.grid $(DEMO)/test_id --out $(DEMO)/grid.png

sample: $(STAMP)
	$(PY) sample.py --config_path configs/tiny/tiny-sd.yaml --n_samples 2 --steps 10 --outdir outputs/tiny-samples

test: $(STAMP)
	$(PY) -m pytest -q --timeout 900

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The README's toy-world table, curve and grid (about 12 minutes on 2 CPU cores).
toy-experiment: $(STAMP)
	$(PY) -m toyworld.experiment --outdir outputs/toy --docs docs

bench: $(STAMP)
	$(PY) bench/bench.py --size tiny --device cpu

clean:
	rm -rf outputs .pytest_cache
