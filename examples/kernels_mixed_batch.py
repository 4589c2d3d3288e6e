"""One mixed batch, three 1-bit deltas: each row gets its own delta's product added to the base output.

Then the same deltas attached to a delta-aware layer: each is written into a slot of the layer's resident
buffer, which its mixed batches read directly (nothing stacked per call), and detaching one zeroes its slot.

Run: python examples/kernels_mixed_batch.py   (CUDA: the Triton kernel; CPU: the PyTorch reference)
"""

import argparse

import torch
from torch import nn

from hf_delta.kernels import DecodeConfig, bitdelta_matmul, chosen_configs, plan_bitdelta_batch, warmup
from hf_delta.layers import DeltaLinear, DeltaParts, DeltaRouting
from hf_delta.methods.bitdelta import BitDeltaWeight
from hf_delta.packing import pack_1bit_u8, unpack_signs

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
gen = torch.Generator().manual_seed(0)
m, k, n, deltas = 8, 256, 128, 3

base_weight = torch.randn(n, k, generator=gen)
signs = pack_1bit_u8(torch.randn(deltas, 1, n, k, generator=gen) > 0)  # [D, passes, N, ceil(K / 8)]
scales = torch.rand(deltas, 1, n, generator=gen) * 0.01  # one scale per output row of each delta
x = torch.randn(m, k, generator=gen)
slots = torch.tensor([0, 1, 2, -1, 2, 2, 0, -1])  # row -> delta; -1 keeps the base output

x_dev = x.to(device, dtype)
signs_dev, scales_dev = signs.to(device), scales.to(device)
# Compile (and on CUDA autotune) this batch size before anything is timed or captured in a CUDA graph.
warmup(bitdelta_matmul, signs_dev, scales_dev, in_features=k, batch_sizes=(m,), deltas_in_use=(deltas,), dtype=dtype)
out = x_dev @ base_weight.to(device, dtype).T  # the shared base matmul, once for every row
plan = plan_bitdelta_batch(slots.to(device), deltas)  # rows grouped by delta; one plan serves every layer
bitdelta_matmul(x_dev, out, slots.to(device), signs_dev, scales_dev, plan=plan)
if device == "cuda":  # the split-K decode kernel forced, and what the launcher picked by itself
    forced = x_dev @ base_weight.to(device, dtype).T
    bitdelta_matmul(x_dev, forced, slots.to(device), signs_dev, scales_dev, plan=plan, config=DecodeConfig(split_k=2))
    print("split-K decode kernel, max difference:", (forced - out).abs().max().item())
    print("picked:", list(chosen_configs().values()))

# The same thing, row by row, with each delta decompressed to a dense matrix.
expected = x @ base_weight.T
for row, d in enumerate(slots.tolist()):
    if d >= 0:
        expected[row] += x[row] @ (scales[d, 0, :, None] * unpack_signs(signs[d, 0], k)).T
error = (out.float().cpu() - expected).abs().max() / expected.abs().max()
print(f"{device} ({dtype}): {m} rows over {deltas} deltas, max relative error vs. per-row dense {error:.1e}")
assert error < 2e-2

# Resident slot buffers: a layer holding the same three deltas (as a DeltaModel's layers do after load_delta).
routing = DeltaRouting()
layer = DeltaLinear(nn.Linear(k, n, bias=False), routing)
with torch.no_grad():
    layer.base_layer.weight.copy_(base_weight)
for d in range(deltas):
    name = f"delta-{d}"
    weight = BitDeltaWeight((n, k), signs[d].clone(), scales[d].clone())
    layer.attach(name, DeltaParts(weight=weight), routing.add(name))
layer.to(device, dtype)  # moves the base and rewrites the resident buffer on the device
buffer = layer.resident_buffer("delta-0")
print(f"resident buffer: {buffer.capacity} slots of signs {tuple(buffer.tensors['signs'].shape[1:])}")
with torch.no_grad(), routing.use(slots.to(device)):
    layered = layer(x_dev)
error = (layered.float().cpu() - expected).abs().max() / expected.abs().max()
print(f"through the layer's resident buffer: max relative error vs. per-row dense {error:.1e}")
assert error < 2e-2
slot = buffer.slot_of("delta-1")
layer.detach("delta-1")
print(f"after detaching delta-1 its slot {slot} is zero: {not buffer.tensors['signs'][slot].any()}")
