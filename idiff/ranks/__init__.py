"""What every rank of a job shares: its environment and process group, the batch split, preemption."""
