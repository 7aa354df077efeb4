"""The in-process trainer: LoRA/DPO on the served base weights, cut into small slices."""
