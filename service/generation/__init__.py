"""Generation: continuous batching over a KV-cache decoder graph, one engine per model.

- `sequence`: a sequence being generated and its sampling (`Sequence`, `SamplingParams`, `StepEvent`, `choose`);
  the task layer builds sequences and reads their events, nothing here imports the task layer.
- `request`: what the engine schedules: one RPC's sequences (`Request`) and a sequence's row (`Slot`).
- `kv_batch`: the running batch's keys and values (`Batch`), refilled in place or laid out again on host.
- `scheduler`: who leaves the batch and who joins it each step (deadlines, count and token budgets).
- `runner`: the decoder graph's runs (prefill, decode), the KV layout graph's, Classify's prefix cache.
- `engine`: the bridge between the event loop and the engine thread, whose step is schedule → run → update.
- `seq2seq`: an encoder–decoder's jobs on the engine thread between steps: a target's log-probabilities given
  its source (teacher forcing) and FillMask's spans by beam search.

Graph input/output names come from `plm.service.contract.graphs`, which export writes by.

Cross-attention (the encoder–decoder family): the encoder's keys and values are computed once per sequence when
it joins (`Runner.prefill` runs the encoder graph) and ride in `Batch.cross` beside `kv`, per-layer
(B, H, S_enc, D) arrays right-padded to the batch's widest source with their mask `cross_mask`; `refill` and every
layout move their rows with the self-attention rows (in host memory: `lay_out_cross`), a decode step feeds them
and never grows them. Their graph names are in `contract.graphs`.
"""
