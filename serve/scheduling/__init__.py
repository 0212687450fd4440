"""Scheduling: the Scheduler deployment (claim → run → record → requeue), the job pipeline it runs, the
fault rules (what requeues, what fails, what is superseded), the fair-share pick and the expert-boundary
checkpoints."""
