"""doconv for Keras 3: not implemented yet (see the project's issue tracker)."""
