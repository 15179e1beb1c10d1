"""Run plumbing: the command line, the Trainer and its subcommands, run folders, loggers, checkpoints, requeueing,
the console and atomic files. What a run needs around the LightningModules; nothing here is a model."""
