"""Training recipes (YAML, package data): hyperparameters per model family and per model/dataset.

`cnn.config.find_recipe` picks `<model>-<dataset>.yaml`, else `<family>.yaml`, else
`default.yaml`; they are written in `cnn.config.TrainConfig`'s sections (`optim:`, `schedule:`,
...). Later sources (config file, flags, `key=value` overrides) win over the recipe. Schedules
are given in epochs and fractions of the run, so `--epochs N` stretches or shrinks them.
"""
