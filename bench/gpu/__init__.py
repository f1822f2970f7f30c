"""The GPU check (`bench/gpu_check.py`): every GPU path of the project and its figures, in one call.

Each part runs in its own process (`python -m bench.gpu.part NAME`), under a time limit, with Ray and vLLM hidden
(the GPU machine has neither), and reports a status (ok, skipped, failed, timeout), its figures and details;
`bench.gpu.runner` runs them in order and writes one JSON. The parts:

- environment       versions of the stack, the GPU's name and memory (`environment.py`)
- policy            the policy folder the learner and rollout parts load: Qwen2.5-VL-3B-shaped, random bf16
                    weights (`models.py`); the tiny test policy with --tiny
- reward_hf_sam2    reward masks/s through RewardWorker (encode once per image, batched decode) vs one full encode
                    + decode per completion, transformers' Sam2Model at SAM2.1-large shape (`reward.py`)
- learner_step      one GRPO step of Learner at the 1-GPU config's settings: seconds and peak memory
                    (`learner_step.py`)
- rollout_hf        the transformers rollout engine: tokens/s for 8 prompts x G=8 with images (`rollout.py`)
- ipc_publish       the CUDA-IPC weight publish to a second process, GB/s vs a device copy (`ipc.py`)
- reward_meta_sam2  reward_hf_sam2 with Meta's sam2 package (`reward.py`)
- pytest_gpu        `pytest -m gpu` over every test module that holds a gpu test (`pytest_gpu.py`)
"""
