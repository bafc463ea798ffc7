"""plm: gRPC serving for the classic lineage of pretrained language models.

One installed namespace. The folders of the repository install under it:
`plm.service` (the server), `plm.models` (training), `plm.data` (the corpus), `plm.export` (ONNX/ARPA export and the
model repository), `plm.client` (the SDK), `plm.api` (the code generated from protos/), and `plm.cli` (the `plm`
command, above all of them).
"""
