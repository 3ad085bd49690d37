"""The running node: the assembler, pipeline workers and delivery senders (one loop shape),
composed with the listeners and the web server by :class:`~mammonode.service.node.Node`."""
