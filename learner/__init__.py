"""The learner: GRPO maths, the policy wrapper, the optimiser step, the sending side of weight sync,
checkpoints and SFT warm-up."""
