"""Rewards: the answer parser, reward terms, segmenters (SAM2 and GrabCut), the reward worker, metrics."""
