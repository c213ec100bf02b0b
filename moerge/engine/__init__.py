"""The merge engine: recipe -> plan -> executor."""
