"""Pure ``nn.Module`` parts of the model: they take sizes or sub-modules, do no I/O and read no configs."""
