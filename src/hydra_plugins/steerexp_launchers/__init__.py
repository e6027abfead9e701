"""steerexp's Hydra plugins (found by Hydra through the `hydra_plugins` namespace package).

- `hydra/launcher=gpus` (`launcher=gpus` in steerexp): every job in a process of its own with its own
  CUDA_VISIBLE_DEVICES from a pool of devices, forked from a fork server that imported torch & co. once,
  jobs concurrent across devices, failures isolated (gpus_launcher.py, jobs.py, _worker.py, _zygote.py;
  `steerexp-sweep rerun <sweep dir>` in steerexp/sweep.py).
- `hydra/launcher=steerexp_basic` (`launcher=basic`, the default): Hydra's basic launcher (jobs one after
  another, in this process) with the same sweep state as launcher=gpus: manifest, job specs, COMPLETED /
  FAILED markers, so `steerexp-sweep status|rerun` work on it too (basic_launcher.py).
- `hydra/sweeper=steerexp_optuna` (`hparams_search=optuna` in steerexp): an Optuna sweeper written on
  Optuna's own ask/tell API (optuna_sweeper.py).
- the `steerexp_unique_dir` resolver: run and sweep directories that never collide, a sweep's claimed
  once and pinned for all its jobs (resolvers.py).
- the public API of a sweep's saved state (sweepstate.py): read each job's state, summarise, rerun jobs
  from their specs. Code outside this package (steerexp/sweep.py: `steerexp-sweep`) uses only that module.

Hydra imports every module here while it scans for plugins, so they import nothing heavy at the top.
"""
from hydra_plugins.steerexp_launchers.resolvers import register_resolvers

register_resolvers()
