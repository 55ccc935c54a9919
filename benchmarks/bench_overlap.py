"""Can one half-batch's attention run beside the other half's weight products? A probe on the GPU.

A RaaS decode step at the 1.5B job shape spends ~4.2 ms in attention (bound by memory bandwidth) and
~2.4 ms in weight products (bound by FLOPs), one after the other. Run 21 split the batch in two halves
on two plain CUDA streams and gained nothing: the kernels met on the SMs only by chance. This script
measures, on 28 layers' caches and weights (batch 512, halves of 256), what a step of those two kinds
of work costs when they are:
- serial, batch 512 (today's step without its small kernels);
- serial, in two halves (the weights read twice);
- pipelined on two streams (attention of one half waits for that half's QKV product, its output
  product waits for its attention), with the attention stream at normal or high priority;
- pipelined on two *green contexts* (CUDA driver API: a disjoint partition of the SMs, k for attention,
  the rest for the products), for a few k;
and the two kinds of work alone on k SMs. Each case is timed as a CUDA graph (green-context streams
capture like any other: runs 40 and 43).

    python benchmarks/bench_overlap.py          # writes bench_overlap.{json,md} to $OUT
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_job import results_dir, save_results
from bench_kernels import CUDA, DEC, md_table
from bench_matmul import timed
from bench_step_kernels import FULL, layer_caches

H, I, QKV = 1536, 8960, 2048  # hidden, intermediate, 12 q + 2 k + 2 v heads of 128
COLS = ["case", "ms_per_step", "vs_serial_512", "note"]


class Green:
    """Two green contexts on a disjoint split of the SMs (k, rest), each with a stream."""

    def __init__(self, k: int, device: int = 0):
        self.cu = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        self._ok(self.cu.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        whole, part, rest = (ctypes.c_ubyte * 4096)(), (ctypes.c_ubyte * 4096)(), (ctypes.c_ubyte * 4096)()
        self._ok(self.cu.cuDeviceGetDevResource(dev, whole, 1), "cuDeviceGetDevResource")  # 1 = SM
        n = ctypes.c_uint(1)
        self._ok(self.cu.cuDevSmResourceSplitByCount(part, ctypes.byref(n), whole, rest, 0, k),
                 "cuDevSmResourceSplitByCount")
        self.sms = [int.from_bytes(bytes(r[96:100]), "little") for r in (part, rest)]
        self.streams = [self._stream(r, dev) for r in (part, rest)]

    def _ok(self, rc, what):
        if rc != 0:
            msg = ctypes.c_char_p()
            self.cu.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA driver error {rc} ({msg.value})")

    def _stream(self, res, dev):
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self._ok(self.cu.cuDevResourceGenerateDesc(ctypes.byref(desc), res, 1), "cuDevResourceGenerateDesc")
        self._ok(self.cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, 1), "cuGreenCtxCreate")
        self._ok(self.cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, 1, 0), "cuGreenCtxStreamCreate")
        return torch.cuda.ExternalStream(stream.value)


class Step:
    """28 layers of a 1.5B-shape decode step's products and RaaS attention, for rows split in halves."""

    def __init__(self, cfg):
        B, L = cfg["B"], cfg["layers"]
        self.L, self.D = L, cfg["D"]
        dev = torch.device("cuda")
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape):
            return (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)

        self.w = [(w(QKV, H), w(H, H), w(2 * I, H), w(H, I)) for _ in range(L)]
        self.caches = [layer_caches(cfg, cfg["raas_pages"], seed) for seed in range(L)]
        self.x = w(B, H) * 50
        half = B // 2
        self.rows = {"all": slice(0, B), 0: slice(0, half), 1: slice(half, B)}

    def pre(self, h, layer):
        return F.linear(self.x[self.rows[h]], self.w[layer][0])

    def attn(self, h, layer, qkv):
        k, v, kmin, kmax, fill, ids, _ = self.caches[layer]
        q = qkv[:, :12 * self.D].reshape(-1, 12, self.D)
        out, _ = DEC.paged_decode_attention_impl(q, k, v, ids[self.rows[h]], fill, self.D ** -0.5,
                                                 key_bounds=(kmin, kmax))
        return out

    def post(self, h, layer, a):
        _, wo, wgu, wd = self.w[layer]
        o = F.linear(a.reshape(a.shape[0], -1), wo)
        gu = F.linear(o, wgu)
        return F.linear(F.silu(gu[:, :I]) * gu[:, I:], wd)

    def serial(self, parts):
        for layer in range(self.L):
            for h in parts:
                self.post(h, layer, self.attn(h, layer, self.pre(h, layer)))

    def only(self, kind, h="all"):
        for layer in range(self.L):
            qkv = self.pre(h, layer) if kind != "products" else None
            if kind == "attention":
                self.attn(h, layer, qkv)
            else:
                self.post(h, layer, torch.empty((self.x[self.rows[h]].shape[0], 12, self.D),
                                                dtype=torch.bfloat16, device=self.x.device))

    def pipelined(self, s_attn, s_prod):
        """Halves 0 and 1: attention on s_attn, products on s_prod, events for each data dependency."""
        main = torch.cuda.current_stream()
        for s in (s_attn, s_prod):
            s.wait_stream(main)
        qkv = {}
        with torch.cuda.stream(s_prod):
            for h in (0, 1):
                qkv[h] = (self.pre(h, 0), self._event(s_prod))
        for layer in range(self.L):
            for h in (0, 1):
                q, ready = qkv[h]
                with torch.cuda.stream(s_attn):
                    s_attn.wait_event(ready)
                    a = self.attn(h, layer, q)
                    done = self._event(s_attn)
                with torch.cuda.stream(s_prod):
                    s_prod.wait_event(done)
                    self.post(h, layer, a)
                    if layer + 1 < self.L:
                        qkv[h] = (self.pre(h, layer + 1), self._event(s_prod))
        for s in (s_attn, s_prod):
            main.wait_stream(s)

    @staticmethod
    def _event(stream):
        e = torch.cuda.Event()
        e.record(stream)
        return e


def measure(rows, name, fn, reps):
    """A case timed as a CUDA graph; one that fails (a driver without green contexts) gets a row saying why."""
    ms, note = float("nan"), ""
    try:
        ms = timed(reps, fn)
    except Exception as e:  # noqa: BLE001
        note = f"failed: {type(e).__name__}: {str(e)[:120]}"
    base = rows[0]["ms_per_step"] if rows else ms
    rows.append({"case": name, "ms_per_step": ms, "vs_serial_512": ms / base, "note": note})
    print(f"  {name:48s} {ms:7.3f} ms  {ms / base:5.2f}x  {note}", flush=True)


def main():
    if not CUDA:
        sys.exit("bench_overlap.py needs a CUDA device")
    cfg, reps = FULL, 5
    step = Step(cfg)
    rows: list[dict] = []
    print(f"# overlap probe, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs", flush=True)
    measure(rows, "serial, batch 512", lambda: step.serial(["all"]), reps)
    measure(rows, "attention only, batch 512 (+ qkv product)", lambda: step.only("attention"), reps)
    measure(rows, "products only, batch 512 (o, gate_up, down)", lambda: step.only("products"), reps)
    measure(rows, "serial, two halves", lambda: step.serial([0, 1]), reps)
    s_a, s_p = torch.cuda.Stream(), torch.cuda.Stream()
    measure(rows, "pipelined, two streams", lambda: step.pipelined(s_a, s_p), reps)
    s_hi = torch.cuda.Stream(priority=-1)
    measure(rows, "pipelined, attention stream high priority", lambda: step.pipelined(s_hi, s_p), reps)

    def save():
        text = "\n".join(["# Overlap probe: 1.5B-shape RaaS step (28 layers, batch 512, L=1024), products vs attention",
                          "", "`python benchmarks/bench_overlap.py`", "", md_table(rows, COLS)])
        save_results(results_dir(), "bench_overlap", {"config": cfg, "rows": rows}, text)

    save()
    for k in (int(a) for a in os.environ.get("OVERLAP_SMS", "40,56,72,88").split(",")):
        try:
            green = Green(k)
        except Exception as e:  # noqa: BLE001
            rows.append({"case": f"green contexts k={k}", "ms_per_step": float("nan"),
                         "vs_serial_512": float("nan"), "note": f"failed: {type(e).__name__}: {str(e)[:160]}"})
            print(f"  green k={k}: {e}", flush=True)
            break
        ga, gp = green.streams
        tag = f"attention {green.sms[0]} SMs / products {green.sms[1]} SMs"
        measure(rows, f"pipelined, green, {tag}", lambda ga=ga, gp=gp: step.pipelined(ga, gp), reps)

        def alone(stream, kind):
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                step.only(kind, 0)
            main.wait_stream(stream)

        measure(rows, f"attention (+ qkv product) alone, half batch, {green.sms[0]} SMs", lambda ga=ga: alone(ga, "attention"), reps)
        measure(rows, f"products alone, half batch, {green.sms[1]} SMs", lambda gp=gp: alone(gp, "products"), reps)
        save()
    print(md_table(rows, COLS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
