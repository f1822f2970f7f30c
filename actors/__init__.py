"""Rollout: engines that sample completions from the policy (vLLM, transformers), prompt building, the
rollout worker and the receiving side of weight sync."""
