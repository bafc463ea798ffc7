"""Generation: continuous batching over a KV-cache decoder graph, one engine per model.

- `sequence`: a sequence being generated and its sampling (`Sequence`, `SamplingParams`, `StepEvent`, `choose`);
  the task layer builds sequences and reads their events, nothing here imports the task layer.
- `request`: what the engine schedules: one RPC's sequences (`Request`) and a sequence's row (`Slot`).
- `kv_batch`: the running batch's keys and values (`Batch`), refilled in place or laid out again on host.
- `scheduler`: who leaves the batch and who joins it each step (deadlines, count and token budgets).
- `runner`: the decoder graph's runs (prefill, decode), the KV layout graph's, Classify's prefix cache.
- `engine`: the bridge between the event loop and the engine thread, whose step is schedule → run → update.

Graph input/output names come from `plm.service.contract.graphs`, which export writes by.

Cross-attention (an encoder–decoder family) fits here without a new layer: the encoder's keys and values are
computed once per sequence when it joins, so they go into `Batch` beside `kv` as a second list of per-layer
(B, H, S_enc, D) arrays with their own mask (`refill`, `Scratch.layout` and the layout graph move their rows
with the self-attention rows, but a decode step never grows them); `Runner.prefill` runs the encoder graph and
`Runner.decode` feeds them as extra inputs, whose names join the decoder's in `contract.graphs`.
"""
