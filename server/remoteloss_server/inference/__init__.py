"""The Open Inference Protocol's messages (package ``inference``), generated from
protos/inference/ by scripts/gen_protos.py; never edit the ``*_pb2`` files by hand."""
