"""steerexp's Hydra plugins (found by Hydra through the `hydra_plugins` namespace package).

- `hydra/launcher=gpus` (`launcher=gpus` in steerexp): every job in a fresh process of its own with its own
  CUDA_VISIBLE_DEVICES from a pool of devices, jobs concurrent across devices, failures isolated, jobs dying
  with the launcher (gpus_launcher.py, jobs.py, _worker.py; `steerexp-sweep rerun <sweep dir>` in steerexp/sweep.py).
- the sweep callback (`hydra.callbacks.sweep_state` in steerexp's conf/config.yaml): the same sweep state
  (job specs, RUNNING / COMPLETED / FAILED markers) for every other launcher, Hydra's basic launcher
  (`launcher=basic`, the default), submitit and Ray included, kept in each job's own process, so
  `steerexp-sweep status|rerun` work on every sweep; a failed job's error becomes the sweep's one-paragraph
  summary at its end (sweep_callback.py).
- `hydra/sweeper=steerexp_optuna` (`hparams_search=optuna` in steerexp): an Optuna sweeper written on
  Optuna's own ask/tell API (optuna_sweeper.py): ours because the released hydra-optuna-sweeper pins optuna < 3.
- the `steerexp_unique_dir` resolver: run and sweep directories that never collide, a sweep's claimed
  once and pinned for all its jobs (resolvers.py).
- the public API of a sweep's saved state (sweepstate.py): read each job's state, summarise, rerun jobs
  from their specs. Code outside this package (steerexp/sweep.py: `steerexp-sweep`) uses only that module.

Hydra imports every module here while it scans for plugins, so they import nothing heavy at the top.
"""
from hydra_plugins.steerexp_launchers.resolvers import register_resolvers

register_resolvers()
