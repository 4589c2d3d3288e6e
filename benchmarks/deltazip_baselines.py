"""DeltaZip against its own ablations on every zoo fine-tune, all in one run.

* GPTQ 4-bit (Hessian error feedback) vs plain round-to-nearest 4-bit of the same delta;
* 2:4 + 4-bit with OBS mask choice and compensation vs magnitude 2:4 (mask fixed by |Δ|, same GPTQ quantiser)
  and vs magnitude 2:4 + round-to-nearest (no Hessian at all);
* 2:4 + 2-bit (the paper's smallest setting);

each as mean next-token KL(fine-tune ‖ compressed) on the held-out texts, plus the size ratio (bf16 fine-tune /
delta weight files), exact-match retention of 2:4 + 4-bit, and what a lossless stage (zlib / lzma over the
saved tensors) would still save on top.

Run: python benchmarks/deltazip_baselines.py --size micro --zoo-dir /tmp/zoo
Writes benchmarks/results/deltazip-baselines-<size>.{json,md}.
"""

from hf_delta.bench.deltazip_baselines import main

if __name__ == "__main__":
    raise SystemExit(main())
