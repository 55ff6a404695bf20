"""A Ray Tune search over fine-tunes (or pretraining runs), one concern per module.

Each trial is a full training run of the shared loop (jobs/training/loop.py):
- `space`: the config's `tune:` section as Ray's search space, scheduler and search
  algorithm, checked before Ray starts;
- `resources`: what a trial holds and how many run at once;
- `trial`: a trial, in process or driving a TorchTrainer, its reports forwarded to Tune;
- `watchdog`: the time budget and the silent-trial stop;
- `pick`: the chosen trial and its checkpoint;
- `outcome`: the result types the driver returns and the tracker logs;
- `driver`: `search`, whose every failure marks the parent run FAILED, saying why.

Tracking: one parent run for the search, one nested run per trial, the chosen checkpoint
registered with an alias.
"""
