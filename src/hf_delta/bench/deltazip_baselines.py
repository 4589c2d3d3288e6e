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

from __future__ import annotations

import argparse
import logging
import lzma
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..compression import compress
from ..evaluation import (
    bf16_weight_bytes,
    exact_match,
    folder_bytes,
    mean_kl,
    retention,
    task_calibration,
    to_markdown,
)
from ..methods import DeltaZipConfig
from ..utils.loading import load_model_and_tokenizer
from ..zoo.build import build_zoo
from .report import environment, write_report

logger = logging.getLogger("deltazip_baselines")

# Setting name -> DeltaZipConfig options (a fresh config per run: compress records facts about the base in it).
SETTINGS = {
    "gptq4": {"bits": 4, "sparsity": None},
    "rtn4": {"bits": 4, "sparsity": None, "use_hessian": False},
    "obs24_4": {"bits": 4, "sparsity": "2:4"},
    "mag24_4": {"bits": 4, "sparsity": "2:4", "prune": "magnitude"},
    "mag24_rtn4": {"bits": 4, "sparsity": "2:4", "use_hessian": False},
    "obs24_2": {"bits": 2, "sparsity": "2:4"},
}
RETENTION_SETTING = "obs24_4"


def lossless_saving(folder: Path) -> dict[str, float]:
    """Fraction of the weight files' tensor bytes that zlib / lzma would still remove."""
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                   for f in sorted(folder.glob("*.safetensors")) for t in load_file(f).values())
    return {"zlib_saving": 1 - len(zlib.compress(raw, 9)) / len(raw),
            "lzma_saving": 1 - len(lzma.compress(raw, preset=9)) / len(raw)}


def measure(entry, zoo, texts: list[str], ft, tok) -> dict:
    """Every setting on one fine-tune: KL, size ratio, compression time; retention and lossless for one."""
    task = zoo.task(entry.name)
    base_path = zoo[entry.base].path
    ft_bytes = bf16_weight_bytes(ft)
    row: dict = {}
    for name, options in SETTINGS.items():
        start = time.perf_counter()
        model = compress(base_path, entry.path, DeltaZipConfig(**options), texts)
        row[f"{name}_s"] = time.perf_counter() - start
        row[f"kl_{name}"] = mean_kl(ft, model, tok, task)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            row[f"ratio_{name}"] = ft_bytes / folder_bytes(tmp)["weights"]
            if name == RETENTION_SETTING:
                row.update(lossless_saving(Path(tmp)))
        if name == RETENTION_SETTING:
            base, _ = load_model_and_tokenizer(base_path)
            if len(tok) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tok), mean_resizing=False)
            base_em, ft_em, em = (exact_match(m, tok, task) for m in (base, ft, model))
            row.update({"em_base": base_em, "em_ft": ft_em, f"em_{name}": em,
                        f"retention_{name}": retention(em, base_em, ft_em) if ft_em != base_em else None})
        logger.info("%s %s: KL %.3e, ratio %.2fx, %.0f s", entry.name, name, row[f"kl_{name}"],
                    row[f"ratio_{name}"], row[f"{name}_s"])
    return row


def run(size: str, zoo_dir: str | None, *, finetunes: list[str] | None, samples: int) -> list[dict]:
    zoo = build_zoo(size, zoo_dir)
    rows = []
    for entry in tqdm([e for e in zoo.finetunes if not finetunes or e.name in finetunes], desc="fine-tunes"):
        ft, tok = load_model_and_tokenizer(entry.path)
        row = measure(entry, zoo, task_calibration(tok, zoo.task(entry.name), n=samples), ft, tok)
        order = [*(f"kl_{n}" for n in SETTINGS), *(f"ratio_{n}" for n in SETTINGS), "em_base", "em_ft",
                 f"em_{RETENTION_SETTING}", f"retention_{RETENTION_SETTING}", "zlib_saving", "lzma_saving",
                 *(f"{n}_s" for n in SETTINGS)]
        rows.append({"fine-tune": entry.name, **{k: row[k] for k in order}})
    return rows


def write(rows: list[dict], out: Path, *, name: str, command: str, extra: dict) -> str:
    """``<name>.json`` (raw numbers) and ``<name>.md`` (KL in scientific notation: micro-zoo values are tiny)."""
    meta = {"command": command, **environment(), **extra}
    shown = [{k: f"{v:.2e}" if k.startswith("kl_") else v for k, v in r.items()} for r in rows]
    md = f"`{command}`\n\n" + to_markdown(shown) + "\n"
    return write_report(out, name, command=command, data={"meta": meta, "rows": rows}, markdown=md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="micro", choices=["micro", "small"], help="zoo size")
    parser.add_argument("--zoo-dir", default=None, help="zoo directory (built there if missing)")
    parser.add_argument("--finetunes", default=None, help="comma-separated fine-tune names (default: all)")
    parser.add_argument("--samples", type=int, default=128, help="calibration texts from the task's training split")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    rows = run(args.size, args.zoo_dir, finetunes=args.finetunes.split(",") if args.finetunes else None,
               samples=args.samples)
    command = "python benchmarks/deltazip_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = write(rows, Path(args.out), name=f"deltazip-baselines-{args.size}", command=command.strip(),
               extra={"settings": SETTINGS, "calibration": f"{args.samples} task training texts"})
    print(md)
    return 0
