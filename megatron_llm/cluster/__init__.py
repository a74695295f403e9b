"""Running on clusters: Slurm allocations, MPI, signals to the launcher, heartbeats and checks.

``python -m megatron_llm.cluster --help`` lists the command-line helpers the Slurm batch script
(launch/slurm/pretrain.sbatch) uses.
"""
