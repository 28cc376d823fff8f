# fundusflow: `make demo` and `make test` work on a machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA := demo_data
DEMO_RUN := demo_run
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all bench lint reliability clean reproduce-dr-grading reproduce-rfmid \
	reproduce-ocunet reproduce-oct reproduce-idrid

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two workers, whole files each (module fixtures are built once): the suite spends much
# of its time in single-threaded start-ups, which a second worker overlaps.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not long" --durations=15 tests

# Everything, the long fault-injection runs included.
test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The fault and bad-input suite (kill -9, bad files, bad CSVs, ...): prints one table,
# fails on any lost record or unexpected crash. `make test` runs its quick version.
reliability: $(STAMP)
	$(PY) -m tests.reliability.run

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
	$(PY) -m benchmarks.epoch_callbacks --model=resnetv2_lite --image_size=128 --batch_size=32 --batches=8
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(PY) -m benchmarks.epoch_callbacks
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(PY) -m benchmarks.initialization
	@if [ -f $(DEMO_RUN)/checkpoints/best.weights.h5 ]; then \
	  $(PY) -m benchmarks.tflite_agreement --workdir=$(DEMO_RUN); \
	else echo "benchmarks.tflite_agreement skipped: needs a trained $(DEMO_RUN) (make demo)"; fi

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)

# The five reference systems (README "Reference systems"): prepare, train, evaluate,
# export, one command each, e.g. `make reproduce-rfmid DATA=path/to/RFMiD`. Output goes to
# $(OUT)/<system>/{prepared,run,export}; a second run needs a new OUT (train refuses a
# used workdir). tests/test_reference_configs.py runs these targets on synthetic layouts
# with SUFFIX=_debug and small sizes (the *_FLAGS variables).
OUT ?= reproduce
SUFFIX ?=
PREPARE_FLAGS ?= --workers=$(shell nproc 2>/dev/null || echo 2)
EVAL_FLAGS ?=
REPRO_DEPS ?= $(STAMP)
ONNX ?= 1  # empty: skip the ONNX exports (they need the "onnx" extra: tf2onnx)
IDRID_GRID ?= --grid=train.learning_rate=1e-2,1e-3,1e-4,1e-5 --grid=train.batch_size=2,4

define chain  # $(1) system dir, $(2) config name, $(3) prepare flags, $(4) evaluate flags
	$(PY) -m input_pipeline.prepare --out_dir=$(OUT)/$(1)/prepared $(3) $(PREPARE_FLAGS)
	$(PY) train.py --gin_file=configs/$(2)$(SUFFIX).gin --workdir=$(OUT)/$(1)/run \
	  --gin_bindings="train.data_dir='$(OUT)/$(1)/prepared'" $(TRAIN_FLAGS)
	$(PY) evaluate.py --workdir=$(OUT)/$(1)/run --split=test $(4) $(EVAL_FLAGS)
	$(PY) export.py --workdir=$(OUT)/$(1)/run --export_dir=$(OUT)/$(1)/export --version=1
endef

comma := ,
space := $(subst ,, )
DR_GRADING_PREPARE = --source=eyepacs --labels_csv="$(DATA)/trainLabels.csv" \
  --images_dir="$(DATA)/train" --task=dr_grade --crop=fundus --image_size=256
RFMID_PREPARE = --source=rfmid --labels_csv="$(DATA)/Training_Set/RFMiD_Training_Labels.csv" \
  --images_dir="$(DATA)/Training_Set/Training" --task=multilabel \
  --min_class_count=$(or $(MIN_CLASS_COUNT),20) --crop=fundus --image_size=256
# ODIR-5K's data.xlsx saved as $(ODIR)/data.csv; its images in "$(ODIR)/Training Images".
OCUNET_PREPARE = --source=rfmid_odir \
  --labels_csv="$(RFMID)/Training_Set/RFMiD_Training_Labels.csv$(comma)$(ODIR)/data.csv" \
  --images_dir="$(RFMID)/Training_Set/Training$(comma)$(ODIR)/Training Images" \
  --task=multilabel --min_class_count=$(or $(MIN_CLASS_COUNT),1) --crop=fundus \
  --clahe=green --image_size=384
OCT_PREPARE = --source=folders --images_dir="$(DATA)" --task=multiclass --crop=none \
  --modality=oct --image_size=224
IDRID_PREPARE = --source=idrid \
  --labels_csv="$(DATA)/B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv" \
  --images_dir="$(DATA)/B. Disease Grading/1. Original Images/a. Training Set" \
  --task=binary --positive_threshold=2 --balance=upsample --crop=fundus --image_size=256

reproduce-dr-grading: $(REPRO_DEPS)
	$(call chain,dr_grading,dr_grading_convnext_tiny_ordinal,$(DR_GRADING_PREPARE))

reproduce-rfmid: $(REPRO_DEPS)
	$(call chain,rfmid,rfmid_multilabel_convnext_tiny,$(RFMID_PREPARE))

reproduce-ocunet: $(REPRO_DEPS)
	$(call chain,ocunet,ocunet_efficientnet_b3_asl,$(OCUNET_PREPARE),--per_class_temperature)
	$(if $(ONNX),$(PY) export.py --workdir=$(OUT)/ocunet/run --export_dir=$(OUT)/ocunet/export \
	  --version=2 --format=onnx)

reproduce-oct: $(REPRO_DEPS)
	$(call chain,oct,oct_mobilenetv3_large,$(OCT_PREPARE))
	$(if $(ONNX),$(PY) export.py --workdir=$(OUT)/oct/run --export_dir=$(OUT)/oct/export \
	  --version=2 --format=onnx)

# Grid search (tune.py) first; the final run trains with the best pair (best.gin).
reproduce-idrid: $(REPRO_DEPS)
	$(PY) -m input_pipeline.prepare --out_dir=$(OUT)/idrid/prepared $(IDRID_PREPARE) \
	  $(PREPARE_FLAGS)
	$(PY) tune.py --gin_file=configs/idrid_binary_resnetv2_lite$(SUFFIX).gin \
	  --gin_bindings="train.data_dir='$(OUT)/idrid/prepared'" --out_dir=$(OUT)/idrid/tune \
	  $(IDRID_GRID)
	$(PY) train.py --gin_file=configs/idrid_binary_resnetv2_lite$(SUFFIX).gin \
	  --gin_file=$(OUT)/idrid/tune/best.gin --workdir=$(OUT)/idrid/run \
	  --gin_bindings="train.data_dir='$(OUT)/idrid/prepared'" $(TRAIN_FLAGS)
	$(PY) evaluate.py --workdir=$(OUT)/idrid/run --split=test $(EVAL_FLAGS)
	$(PY) export.py --workdir=$(OUT)/idrid/run --export_dir=$(OUT)/idrid/export --version=1

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

# RetinaMNIST also trains the config with seeds 1-4 and evaluates the 5-seed ensemble
# (mean probabilities; evaluation/ensemble.py) into $(REAL)/retinamnist/ensemble/.
RETINA_SEEDS := 1 2 3 4
RETINA_RUNS := $(REAL)/retinamnist/run $(RETINA_SEEDS:%=$(REAL)/retinamnist/run_seed%)
reproduce-retinamnist: $(STAMP) check-data
	$(PREPARE) --source=npz --labels_csv=$(DATA)/retinamnist.npz \
	  --out_dir=$(REAL)/retinamnist/data --task=dr_grade --split_column=split --crop=none \
	  --image_size=28
	$(call train_evaluate_export,retinamnist,retinamnist_resnetv2_lite)
	for s in $(RETINA_SEEDS); do rm -rf $(REAL)/retinamnist/run_seed$$s && \
	  $(PY) train.py --gin_file=configs/retinamnist_resnetv2_lite.gin \
	    --gin_bindings="train.data_dir='$(REAL)/retinamnist/data'" \
	    --gin_bindings="train.seed=$$s" --workdir=$(REAL)/retinamnist/run_seed$$s || exit 1; \
	done
	$(PY) -m evaluation.ensemble --workdirs=$(subst $(space),$(comma),$(RETINA_RUNS)) \
	  --out_dir=$(REAL)/retinamnist/ensemble --split=test

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
