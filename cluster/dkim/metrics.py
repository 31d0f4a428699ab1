"""Prometheus metrics of DKIM signing (names: mtacluster_dkim_*), counted by the frontend that signs."""

from prometheus_client import Counter, Histogram

# result: signed | no_key (eligible mail whose From: domain has no key) | no_from (no usable From: address)
#         | error (the key operation failed; the message goes out unsigned)
SIGNATURES = Counter("mtacluster_dkim_signatures", "DKIM signing decisions for relayed mail, by result.",
                     ["result"])
SIGNATURE_RESULTS = ("signed", "no_key", "no_from", "error")
SIGN_DURATION = Histogram("mtacluster_dkim_sign_duration_seconds",
                          "Time to canonicalize, hash and sign one message.",
                          buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5))
