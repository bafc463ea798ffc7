"""The front ends: each translates one wire protocol to the data plane's typed requests and its typed results
back (plm_v1.py: plm.v1 gRPC and the admin service; kserve.py: KServe v2 / Triton gRPC). grpc_edge.py is what
the gRPC ones share: the request id from metadata, the deadline, statuses."""
