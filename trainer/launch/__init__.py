"""Where runs are launched: local sweep jobs, SLURM submission and SLURM sweeps.

Launchers never import the CLI: it passes them the function a job runs."""
