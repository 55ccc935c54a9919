"""CUDA graphs of the decode step, one per (batch-size bucket, page-table width bucket, whole step or not).

A decode step on the GPU launches hundreds of small kernels (per layer: norms, projections, the
policy's page choice, kv_append, attention); replaying a captured graph removes their launch cost.
What a graph holds never synchronises with the host: the model runner's `decode_step` (the forward,
the head, the sampler, the last-token write and the policy's counters) when no logits hook needs the
logits on the way, else its `decode_forward` alone.

Padding rows (a batch of B runs in the graph of the smallest bucket >= B) use the padding slot
(`pad_slot`, one past the real slots) whose page table is the engine's scratch page; its fill is
reset before every replay, so padding rows write only there and read only there.

Capture runs on dummy inputs (all rows padding), so capturing never touches a real sequence's pages.
"""

from __future__ import annotations

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_width: int, pad_slot: int, scratch_page: int):
        self.runner, self.pad_slot, self.scratch_page = runner, pad_slot, scratch_page
        self.max_width = max_width
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        n = self.buckets[-1]
        dev = runner.device
        self.inputs = torch.zeros(2, n, dtype=torch.int64, device=dev)  # rows: positions, slots
        # Two pinned staging buffers, used in turn: the one written for step t+2 was read by step t's
        # copy, which has completed (the host recorded step t's tokens before launching t+2).
        self.staging = [torch.zeros(2, n, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._turn = 0
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, bool], tuple] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self.warm_up_stream, self.capture_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def width_bucket(self, width: int) -> int:
        w = 16
        while w < width:
            w *= 2
        return min(w, self.max_width)

    def _reset_scratch(self) -> None:
        self.runner.pool.fill[:, self.scratch_page] = 0

    def _warm_up_once(self, step, pos: torch.Tensor, slots: torch.Tensor, width: int) -> None:
        """One eager step on dummy inputs before a capture (the first for a new shape compiles its kernels)."""
        self._reset_scratch()
        step(pos, slots, width)

    def _capture(self, bs: int, width: int, sample: bool) -> None:
        self.inputs[0, :bs] = 0
        self.inputs[1, :bs] = self.pad_slot
        pos, slots = self.inputs[0, :bs], self.inputs[1, :bs]
        step = self.runner.decode_step if sample else self.runner.decode_forward
        stream = self.warm_up_stream
        stream.wait_stream(torch.cuda.current_stream())
        # One eager warm-up step: it compiles the Triton kernels this shape needs and sets up the side stream's
        # cuBLAS workspace. A second (the rule up to run 63) only repeated it, and a draining job captures a
        # graph at every batch bucket it reaches (runs 64-65 in docs/gpu-notes.md time them).
        with torch.cuda.stream(stream):
            self._warm_up_once(step, pos, slots, width)
        torch.cuda.current_stream().wait_stream(stream)
        self._reset_scratch()
        graph = torch.cuda.CUDAGraph()
        # The graph API itself, not the torch.cuda.graph context: that one also synchronises the device and
        # empties the device and pinned-host caching allocators before every capture (memory for a one-off
        # capture), which a job that captures as its batch drains would pay again at every new bucket, and
        # then again in the allocations of the steps after it.
        with torch.cuda.stream(self.capture_stream):
            graph.capture_begin(pool=self.mempool)
            try:
                out = step(pos, slots, width)
            finally:
                graph.capture_end()
        self.graphs[(bs, width, sample)], self.outputs[(bs, width, sample)] = graph, out

    def run(self, positions: list[int], slots: list[int], width: int, sample: bool = False):
        """Enqueue the graph for the B given sequences (the inputs travel from pinned memory) -> device
        views of its outputs: (tokens [B], the policy's stats) with sample (the runner's `decode_step`),
        else (hidden [B, hidden], positions [B], slots [B]) (`decode_forward`, and the inputs)."""
        B = len(positions)
        bs = next(b for b in self.buckets if b >= B)
        key = (bs, self.width_bucket(width), sample)
        if key not in self.graphs:
            self._capture(*key)
        staging = self.staging[self._turn]
        self._turn ^= 1
        staging[0, :B] = torch.tensor(positions)
        staging[1, :B] = torch.tensor(slots)
        staging[0, B:bs] = 0
        staging[1, B:bs] = self.pad_slot
        self.inputs[:, :bs].copy_(staging[:, :bs], non_blocking=True)
        self._reset_scratch()
        self.graphs[key].replay()
        out = self.outputs[key]
        if sample:
            return out[0][:B], out[1]
        return out[:B], self.inputs[0, :B], self.inputs[1, :B]
