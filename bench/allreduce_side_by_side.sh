#!/usr/bin/env bash
# Side-by-side all-reduce benchmark on this machine, in one run: PyTorch gloo (TCP, no
# encryption) and ringtune's ring all-reduce (TLS 1.3 on every link) for the same world
# sizes and payloads, printed as one table of bus bandwidth (busbw = algbw * 2(W-1)/W,
# GB = 1e9 bytes; per iteration the slowest rank's time, median over iterations).
#
#   bench/allreduce_side_by_side.sh                    # W=2,4; 64 and 256 MiB
#   WORLDS=2 SIZES=16,64 VARIANTS=tcp-tls bench/allreduce_side_by_side.sh
#
# VARIANTS: comma list of ringtune transports, each optionally with ":bf16" (gradients
# sent as bf16, summed in f32). PYTHON must have torch (default: the bench venv).
set -euo pipefail
cd "$(dirname "$0")/.."

WORLDS=${WORLDS:-2,4}
SIZES=${SIZES:-64,256}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
VARIANTS=${VARIANTS:-quic,tcp-tls,tcp-tls:bf16}
PY=${PYTHON:-$HOME/.cache/ringtune-bench-venv/bin/python}
GLOO=${GLOO_SCRIPT:-../shared/bench/allreduce_gloo.py}
OUT=${OUT_DIR:-$(mktemp -d)}

if [[ -z "${RINGTUNE_BIN:-}" ]]; then
  # The dev profile builds dependencies and the collectives crates at opt-level 3.
  cargo build -q -p ringtune
  RINGTUNE_BIN=target/debug/ringtune
fi

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)" >&2
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" "$GLOO" --world-sizes "$WORLDS" --sizes-mib "$SIZES" --iters "$ITERS" --warmup "$WARMUP" \
  --out-json "$OUT/gloo.json" --out-md "$OUT/gloo.md" >/dev/null

: > "$OUT/ringtune.jsonl"
IFS=, read -ra worlds <<< "$WORLDS"
IFS=, read -ra variants <<< "$VARIANTS"
for w in "${worlds[@]}"; do
  for v in "${variants[@]}"; do
    transport=${v%%:*}
    extra=()
    [[ "$v" == *:bf16 ]] && extra+=(--bf16)
    "$RINGTUNE_BIN" bench allreduce --world "$w" --sizes-mib "$SIZES" --iters "$ITERS" \
      --warmup "$WARMUP" --transport "$transport" --json "${extra[@]}" \
      | sed "s/^{/{\"variant\":\"$v\",/" >> "$OUT/ringtune.jsonl"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" - "$OUT/gloo.json" "$OUT/ringtune.jsonl" "$VARIANTS" <<'PYEOF'
import json, sys
gloo = json.load(open(sys.argv[1]))["results"]
rt = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
variants = sys.argv[3].split(",")
g = {(r["world"], r["bytes"]): r for r in gloo}
head = "| W | size | gloo busbw GB/s |" + "".join(f" ringtune {v} busbw GB/s (x gloo) |" for v in variants)
print(head)
print("|---|---|---|" + "---|" * len(variants))
for (w, b), gr in sorted(g.items()):
    row = f"| {w} | {b >> 20} MiB | {gr['busbw_GBps']:.3f} |"
    for v in variants:
        m = [r for r in rt if r["variant"] == v and r["world"] == w and r["bytes"] == b]
        if m:
            x = m[0]
            ok = "" if x["correct"] else " WRONG"
            row += f" {x['busbw_gbps']:.3f} ({x['busbw_gbps'] / gr['busbw_GBps']:.2f}x){ok} |"
        else:
            row += " - |"
    print(row)
print("\nringtune: TLS 1.3 (AES-128-GCM) on every link; gloo: plaintext TCP. "
      "Same machine, run back to back; median of per-iteration max over ranks.")
PYEOF
