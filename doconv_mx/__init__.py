"""doconv for MXNet Gluon: not implemented yet (see the project's issue tracker)."""
