"""SDPA, two batched GEMMs and the fused kernel for a CPU encoder's attention (pipeline/attention.py).

Each model is optimized the library's way (compile off, as the optimizer plans CPU encoders) in
each precision; the report's choice is printed. Then the same model runs with every fused
self-attention set to torch's SDPA, to `bmm_attention` and (bf16, where it can run) to
torchbridge's fused kernel, timed against each other in this one process (rounds of ``--runs``
calls, order rotating, median of the round medians and p90, first call apart) on a full-length
batch and on a mixed-length padded one (the encoder removes the padding and attends by groups of
similar length, or in one call with the fused kernel), with each one's min cosine to the fp32
eager model at real positions. Models: BERT-base with random weights (speed does not depend on
them) and real all-MiniLM-L6-v2 when its asset can be fetched. Writes JSON:

    python benchmarks/attention_kernels.py --output bench-results/attention_kernels.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import load_minilm
from torchbridge.bench.harness import round_timings, time_rounds
from torchbridge.bench.report import write_study
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.attention import fused_kernel_unavailable
from torchbridge.pipeline.fusion import FusedQKVSelfAttention
from torchbridge.pipeline.loading import load_model

PRECISIONS = {"bf16": {"dtype": torch.bfloat16}, "fp32": {"dtype": torch.float32},
              "int8-static": {"quantization": "int8-static"}}
KERNELS = {"sdpa": "model", "bmm": "bmm", "fused": "fused"}


def batches(batch: int, seq: int) -> dict[str, dict[str, torch.Tensor]]:
    ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    for row in range(batch):  # lengths from seq down to a quarter of it, as the headline's
        padded[row, seq - (row * 3 * seq) // (4 * max(batch - 1, 1)):] = 0
    return {"full": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "padded": {"input_ids": ids, "attention_mask": padded}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("bench-results/attention_kernels.json"))
    args = parser.parse_args()
    models = {"bert-base (random weights)": (load_model(
        "bert-base-uncased", "feature-extraction", random_weights=True), 8, 128)}
    rows: list[dict] = []
    try:
        models["all-MiniLM-L6-v2"] = (load_minilm()[0], 32, 128)
    except AssetUnavailableError as err:  # optional asset: say why it is missing
        rows.append({"model": "all-MiniLM-L6-v2", "note": f"not measured: {err}"})
        print(rows[-1]["note"])
    for name, (model, batch, seq) in models.items():
        model.eval()
        for precision in args.precisions:
            opt = TextModelOptimizer(TextModelConfig(
                use_torch_compile=False, warmup_batch_size=batch, warmup_seq_len=seq,
                **PRECISIONS[precision]))
            optimized = opt.optimize(model, task="feature-extraction")
            fused = [m for m in optimized.modules() if isinstance(m, FusedQKVSelfAttention)]
            chosen = sorted({"sdpa" if m.kernel == "model" else m.kernel for m in fused})
            kernels = {k: v for k, v in KERNELS.items() if k != "fused" or fused_kernel_unavailable(
                opt.dtype, fused[0].head_size) is None}
            for kind, inputs in batches(batch, seq).items():
                def call(kernel: str, inputs=inputs, fused=fused, optimized=optimized):
                    for module in fused:
                        module.kernel = kernel
                    return optimized(**inputs).last_hidden_state

                calls = {k: (lambda kernel=kernel: call(kernel)) for k, kernel in kernels.items()}
                with torch.inference_mode():
                    keep = inputs["attention_mask"].bool()
                    ref = model(**inputs).last_hidden_state[keep]
                    cosine = {k: round(float(torch.nn.functional.cosine_similarity(
                        c()[keep].float(), ref).min()), 6) for k, c in calls.items()}
                    timed = time_rounds(calls, rounds=args.rounds, runs=args.runs)
                med = {k: t["median_ms"] for k, t in timed.items()}
                row = {"model": name, "precision": precision, "inputs": kind, "shape": [batch, seq],
                       "optimizer_chose": chosen,
                       **round_timings(timed),
                       "speedup_over_sdpa": {k: round(med["sdpa"] / med[k], 3) for k in med},
                       "min_cosine_to_fp32": cosine}
                rows.append(row)
                times = ", ".join(f"{k} {med[k]:.1f} ms" for k in med)
                print(f"{name} {precision} {kind} {batch}x{seq}: {times}; speedup over SDPA "
                      f"{row['speedup_over_sdpa']}, optimizer chose "
                      f"{'/'.join(row['optimizer_chose'])}, min cosine to fp32 {cosine}", flush=True)
    write_study(args.output, rows)


if __name__ == "__main__":
    main()
