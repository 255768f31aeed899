"""The load suite: fleet-scale workloads against a baseline measured in the same run."""
