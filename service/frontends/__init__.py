"""The front ends: each translates one wire protocol to the data plane's typed requests and its typed results
back (plm_v1.py: plm.v1 gRPC and the admin service; kserve.py with its task table kserve_tasks.py: KServe v2 /
Triton gRPC; openai_http.py with its JSON in openai_http_wire.py and its logprobs alternatives in
openai_logprobs.py: the OpenAI-compatible HTTP API; json_http.py: plm.v1 as JSON on the same HTTP app).
grpc_edge.py is what the gRPC ones share: the request id from metadata, the deadline, statuses; http_edge.py
what the HTTP ones share: the call's opening, the body, HTTP statuses, streamed responses."""
