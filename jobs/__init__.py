"""Thin entrypoints for `ray job submit --working-dir . -- python -m jobs.<stage> --config configs/<file>.yaml`."""
