"""Update rules, one file each: a config dataclass, a loss as a pure function over a TensorDict batch, and a
`train_step` that the unit tests, the single-process loop and the Ray Train learners all call."""
