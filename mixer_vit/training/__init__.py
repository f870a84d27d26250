"""The training library: the loop (train), its set-up (run_setup), jitted steps, optimiser, losses, metrics, few-shot probes, stopping on signals, memory dry runs and config helpers."""
