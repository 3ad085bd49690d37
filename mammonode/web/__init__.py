"""The node's HTTP surface: QIDO-RS/WADO-RS over what it holds, the status page, ``/status``
and ``/metrics`` (STOW-RS, which receives, lives in ingest/)."""
