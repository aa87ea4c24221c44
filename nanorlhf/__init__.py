"""nanorlhf: a minimal, readable RLHF pipeline (PT, SFT, RM, PPO) in pure PyTorch."""
