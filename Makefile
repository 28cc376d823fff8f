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

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)

# ----------------------------------------------------------------------------- real data
# README "Results on real data": prepare -> train -> evaluate -> export, from scratch on
# CPU. DATA is the dataset folder: for RetinaMNIST the one holding retinamnist.npz, for
# the Mexican sets the one holding labels.csv, duplicates.csv and images/. Prepared data,
# workdirs and exports go under $(REAL)/<name>/.
REAL ?= real_runs
PREPARE := $(PY) -m input_pipeline.prepare --workers=2 --overwrite
MEXICO_PREPARE = --source=mexico --labels_csv=$(DATA)/labels.csv --images_dir=$(DATA) \
  --duplicates_csv=$(DATA)/duplicates.csv --image_size=192

.PHONY: reproduce-retinamnist reproduce-mexico-fundus-dme reproduce-mexico-fundus-dr \
  reproduce-mexico-oct-dme crosscheck-retinamnist-on-mexico check-data

check-data:
	@test -n "$(DATA)" || { echo "Set DATA=path/to/the/dataset/folder"; exit 2; }

# train -> evaluate with flip TTA (kept as eval_tta/) -> evaluate a single view (eval/,
# the decision export.py serves) -> export. $(1): name under $(REAL); $(2): config name.
define train_evaluate_export
	rm -rf $(REAL)/$(1)/run $(REAL)/$(1)/export
	$(PY) train.py --gin_file=configs/$(2).gin \
	  --gin_bindings="train.data_dir='$(REAL)/$(1)/data'" --workdir=$(REAL)/$(1)/run
	$(PY) evaluate.py --workdir=$(REAL)/$(1)/run --split=test --tta
	mv $(REAL)/$(1)/run/eval $(REAL)/$(1)/run/eval_tta
	$(PY) evaluate.py --workdir=$(REAL)/$(1)/run --split=test
	$(PY) export.py --workdir=$(REAL)/$(1)/run --export_dir=$(REAL)/$(1)/export --version=1
	$(PY) -m evaluation.summary --eval=eval_tta $(REAL)/$(1)/run
	$(PY) -m evaluation.summary $(REAL)/$(1)/run
endef

reproduce-retinamnist: $(STAMP) check-data
	$(PREPARE) --source=npz --labels_csv=$(DATA)/retinamnist.npz \
	  --out_dir=$(REAL)/retinamnist/data --task=dr_grade --split_column=split --crop=none \
	  --image_size=28
	$(call train_evaluate_export,retinamnist,retinamnist_resnetv2_lite)

reproduce-mexico-fundus-dme: $(STAMP) check-data
	$(PREPARE) $(MEXICO_PREPARE) --out_dir=$(REAL)/mexico_fundus_dme/data --task=binary \
	  --label_column=dme --clahe=green
	$(call train_evaluate_export,mexico_fundus_dme,mexico_fundus_dme)

reproduce-mexico-fundus-dr: $(STAMP) check-data
	$(PREPARE) $(MEXICO_PREPARE) --out_dir=$(REAL)/mexico_fundus_dr/data --task=dr_grade \
	  --label_column=dr --class_names=none,npdr,pdr --clahe=green
	$(call train_evaluate_export,mexico_fundus_dr,mexico_fundus_dr)

reproduce-mexico-oct-dme: $(STAMP) check-data
	$(PREPARE) $(MEXICO_PREPARE) --out_dir=$(REAL)/mexico_oct_dme/data --task=binary \
	  --label_column=dme --crop=none
	$(call train_evaluate_export,mexico_oct_dme,mexico_oct_dme)

# External validation: the RetinaMNIST model (run reproduce-retinamnist first) on the
# Mexican fundus photographs with a known DR grade, prepared like RetinaMNIST (28 px, no
# crop) as a test-only set. Grades map none:0, npdr:1, pdr:4, so only the any-DR AUC
# (grade >= 1 vs none) compares like with like. DATA = the Mexican fundus folder.
XCHECK := $(REAL)/crosscheck
crosscheck-retinamnist-on-mexico: $(STAMP) check-data
	mkdir -p $(XCHECK)
	awk -F, '{sub(/\r$$/, "")} NR == 1 {print $$0 ",split"; next} {print $$0 ",test"}' \
	  $(DATA)/labels.csv > $(XCHECK)/labels_test.csv
	$(PREPARE) --source=mexico --labels_csv=$(XCHECK)/labels_test.csv --images_dir=$(DATA) \
	  --duplicates_csv=$(DATA)/duplicates.csv --split_column=split \
	  --out_dir=$(XCHECK)/mexico_fundus_dr5 --task=dr_grade --label_column=dr \
	  --label_map=none:0,npdr:1,pdr:4 --crop=none --image_size=28
	$(PY) evaluate.py --workdir=$(REAL)/retinamnist/run --data_dir=$(XCHECK)/mexico_fundus_dr5 \
	  --split=test
	$(PY) -m evaluation.summary --eval=eval/external/mexico_fundus_dr5 $(REAL)/retinamnist/run
