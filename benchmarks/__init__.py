"""End-to-end benchmarks: smtp-source -> system under test (mtacluster or a private Postfix) -> smtp-sink.

Run `python -m benchmarks.e2e --help`; README.md in this folder explains the figures and how they are measured.
"""
