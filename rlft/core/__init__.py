"""Pure maths below every other layer: schedules and sampler steps (no Ray, no files)."""
