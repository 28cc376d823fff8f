# fundusflow: `make demo` and `make test` work on a machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA := demo_data
DEMO_RUN := demo_run
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

.PHONY: demo test bench lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The whole flow on embedded synthetic data: generate, prepare, train, evaluate,
# export, predict. A few minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) -m input_pipeline.synthetic --out_dir=$(DEMO_DATA)/raw --num_images=800 --image_size=256 --seed=0
	$(PY) -m input_pipeline.prepare --labels_csv=$(DEMO_DATA)/raw/labels.csv \
	  --images_dir=$(DEMO_DATA)/raw --out_dir=$(DEMO_DATA)/prepared --task=dr_grade \
	  --label_column=dr_grade --image_size=128 --num_shards=4 --workers=2
	rm -rf $(DEMO_RUN)
	$(PY) train.py --gin_file=configs/demo.gin --workdir=$(DEMO_RUN)
	$(PY) evaluate.py --workdir=$(DEMO_RUN) --split=test
	$(PY) export.py --workdir=$(DEMO_RUN) --export_dir=$(DEMO_RUN)/export --version=1
	$(PY) predict.py --model=$(DEMO_RUN)/export/1 --out=$(DEMO_RUN)/predictions.csv \
	  $(DEMO_DATA)/raw/images/00079*.jpg
	@echo "Report: $(DEMO_RUN)/eval/report.html   Predictions: $(DEMO_RUN)/predictions.csv"

# CPU benchmarks (print ratios measured side by side). The GPU training
# benchmark runs on a GPU host: see benchmarks/train_throughput.py.
bench: $(STAMP)
	$(PY) -m benchmarks.prepare_speed
	$(PY) -m benchmarks.input_pipeline
	$(PY) -m benchmarks.serving_latency
	$(PY) -m benchmarks.serving_parity
	@if [ -f $(DEMO_RUN)/checkpoints/best.weights.h5 ]; then \
	  $(PY) -m benchmarks.tflite_agreement --workdir=$(DEMO_RUN); \
	else echo "benchmarks.tflite_agreement skipped: needs a trained $(DEMO_RUN) (make demo)"; fi

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)
