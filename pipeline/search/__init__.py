"""Optuna: studies, trials, worker processes, sessions. One job a module; this file imports nothing,
so that `compare` and `dashboard` (which need only the study file, the summary and the names) never
load torch or the trainer.

    study_file.py  studies/<name>.toml -> a validated StudySpec (space.py: the searched parameters)
    study.py       open or prepare a study: its attributes, warm start, re-queued interruptions
    objective.py   one trial: sample, train through the shared trainer, report, prune, record
    workers.py     the trial loop of a worker process; worker processes; storage-loss recovery
    session.py     one `make tune`: the search within its budget, then the final phase
    summary.py     the progress line after each trial and the numbers a session reports
    interrupts.py  Ctrl-C held while a store is written, raised where the trial can end
    baseline.py    `make baseline`: the study's default configuration trained alone for its time
"""
