"""doconv for PyTorch: not implemented yet (see the project's issue tracker)."""
