"""Plumbing shared by the stages and entry points: errors, checkpoints, loggers, the command
line, devices and speed switches. Nothing here knows the method; importing this package
imports nothing heavy (the diffusion math uses `gpsr.utils.errors` and stays Lightning-free)."""
