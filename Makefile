# Two commands: `make demo` (train + evaluate a small HTC on synthetic COCO, CPU; outputs/demo/summary.png)
# and `make test`. Both create .venv on first use.
PY := .venv/bin/python
DATA := data/synthetic_coco

.PHONY: demo test venv lint

$(PY): pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(PY)

venv: $(PY)

$(DATA)/annotations/instances_val2017.json: | $(PY)
	$(PY) -m htc_lightning.data.synthetic --out $(DATA) --num-train 300 --num-val 50 --seed 0 --image-size 128 128

demo: $(PY) $(DATA)/annotations/instances_val2017.json
	$(PY) cli.py fit --config configs/demo/htc_tiny_synthetic.yaml
	$(PY) cli.py test --config configs/demo/htc_tiny_synthetic.yaml --ckpt_path outputs/demo/checkpoints/last.ckpt
	$(PY) -m htc_lightning.tools.demo_summary --config configs/demo/htc_tiny_synthetic.yaml \
		--ckpt_path outputs/demo/checkpoints/last.ckpt --out outputs/demo/summary.png

# The reference tests (numbers computed elsewhere: mmdet and FishNet dumps) run twice more as on other machines:
# scalar kernels on one thread, then AVX2 kernels with oneDNN's convolutions capped at SSE4.1 (an old CPU's
# path, which moved near-tied RPN proposals in issue 24) on two. More settings: benchmarks/parity_machines.py.
test: $(PY)
	$(PY) -m pytest -q
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -m reference
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=2 $(PY) -m pytest -q -m reference

lint: $(PY)
	.venv/bin/ruff check .
