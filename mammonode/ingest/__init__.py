"""How objects enter the node: the DIMSE listener, the STOW-RS handler, and the one durable
store both hand their data sets to (nothing is acknowledged before it is on disk and in the
database), with the storage directory's layout and start-up recovery."""
