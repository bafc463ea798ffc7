"""The public data plane under every protocol: typed requests (requests.py), their validation (validation.py),
and the plane itself (plane.py: per-call edge, model lookup, the tasks). Protocol-free: no protobuf here."""
