"""Protocol adapters: translate a wire format to the DataPlane's types and back, nothing else."""
