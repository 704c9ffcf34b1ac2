#!/usr/bin/env bash
# Side-by-side all-reduce benchmark on this machine, in one run: PyTorch gloo (TCP, no
# encryption) and ringtune's ring all-reduce for the same world sizes and payloads, printed
# as one table of bus bandwidth (busbw = algbw * 2(W-1)/W, GB = 1e9 bytes; per iteration
# the slowest rank's time, median over iterations). ringtune transports: quic (TLS 1.3),
# tcp-tls (TLS 1.3 handshake, AES-128-GCM frames), tcp-plain (token proof, NO encryption).
#
#   bench/allreduce_side_by_side.sh                    # W=2,4; 64 and 256 MiB
#   WORLDS=2 SIZES=16,64 VARIANTS=tcp-tls bench/allreduce_side_by_side.sh
#   GLOO_CPU=1 bench/allreduce_side_by_side.sh          # also gloo's CPU time per all-reduce
#
# VARIANTS: comma list of ringtune transports, each optionally with ":bf16" (gradients
# sent as bf16, summed in f32) and/or ":inline" / ":threads" (the TCP link driver; default
# auto). PYTHON must have torch (default: the bench venv).
set -euo pipefail
cd "$(dirname "$0")/.."

WORLDS=${WORLDS:-2,4}
SIZES=${SIZES:-64,256}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
VARIANTS=${VARIANTS:-quic,tcp-tls,tcp-plain}
PY=${PYTHON:-$HOME/.cache/ringtune-bench-venv/bin/python}
GLOO=${GLOO_SCRIPT:-../shared/bench/allreduce_gloo.py}
OUT=${OUT_DIR:-$(mktemp -d)}

if [[ -z "${RINGTUNE_BIN:-}" ]]; then
  # The dev profile builds dependencies and the collectives crates at opt-level 3.
  cargo build -q -p ringtune
  RINGTUNE_BIN=target/debug/ringtune
fi

cat > "$OUT/gloo_cpu.py" <<'PYEOF'
# CPU seconds per gloo all-reduce, summed over ranks (time.process_time around the call).
import os, sys, socket, statistics, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
def worker(rank, world, port, mib, iters, q):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"; torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buf = torch.ones(mib * (1 << 20) // 4); cpu = []
    for it in range(iters + 1):
        dist.barrier(); c0 = time.process_time()
        dist.all_reduce(buf)
        if it: cpu.append(time.process_time() - c0)
    c = torch.tensor(cpu, dtype=torch.float64); dist.all_reduce(c)
    if rank == 0: q.put(c.tolist())
    dist.barrier(); dist.destroy_process_group()
if __name__ == "__main__":
    world, mib, iters = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ctx = mp.get_context("spawn"); q = ctx.Queue(); port = free_port()
    ps = [ctx.Process(target=worker, args=(r, world, port, mib, iters, q)) for r in range(world)]
    [p.start() for p in ps]; c = q.get(); [p.join() for p in ps]
    print(f"gloo W={world} {mib} MiB: {statistics.median(c) * 1e3:.0f} ms CPU (all ranks) per all-reduce")
PYEOF

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)" >&2
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

: > "$OUT/ringtune.jsonl"
: > "$OUT/gloo_cpu.txt"
IFS=, read -ra worlds <<< "$WORLDS"
IFS=, read -ra variants <<< "$VARIANTS"
IFS=, read -ra sizes <<< "$SIZES"
for w in "${worlds[@]}"; do
  # gloo right before ringtune at each world size, so both see about the same machine load.
  "$PY" "$GLOO" --world-sizes "$w" --sizes-mib "$SIZES" --iters "$ITERS" --warmup "$WARMUP" \
    --out-json "$OUT/gloo_w$w.json" --out-md "$OUT/gloo_w$w.md" >/dev/null
  if [[ -n "${GLOO_CPU:-}" ]]; then
    # CPU seconds per gloo all-reduce, all ranks together (ringtune reports its own).
    for s in "${sizes[@]}"; do "$PY" "$OUT/gloo_cpu.py" "$w" "$s" "$ITERS" >> "$OUT/gloo_cpu.txt"; done
  fi
  for v in "${variants[@]}"; do
    transport=${v%%:*}
    extra=()
    [[ "$v" == *:bf16* ]] && extra+=(--bf16)
    [[ "$v" == *:inline* ]] && extra+=(--tcp-io inline)
    [[ "$v" == *:threads* ]] && extra+=(--tcp-io threads)
    "$RINGTUNE_BIN" bench allreduce --world "$w" --sizes-mib "$SIZES" --iters "$ITERS" \
      --warmup "$WARMUP" --transport "$transport" --json "${extra[@]}" \
      | sed "s/^{/{\"variant\":\"$v\",/" >> "$OUT/ringtune.jsonl"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$PY" - "$OUT" <<'PYEOF'
import glob, json, sys
res = []
for f in sorted(glob.glob(sys.argv[1] + "/gloo_w*.json")):
    res += json.load(open(f))["results"]
json.dump({"results": res}, open(sys.argv[1] + "/gloo.json", "w"))
PYEOF

cat "$OUT/gloo_cpu.txt"
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
            cpu = x.get("cpu_s_all_ranks")
            cpu = f", {cpu * 1e3:.0f} ms CPU" if cpu is not None else ""
            row += f" {x['busbw_gbps']:.3f} ({x['busbw_gbps'] / gr['busbw_GBps']:.2f}x{cpu}){ok} |"
        else:
            row += " - |"
    print(row)
print("\nringtune quic and tcp-tls: encrypted and authenticated (AES-128-GCM) on every link; "
      "tcp-plain and gloo: plaintext TCP. Same machine, run back to back; median of "
      "per-iteration max over ranks.")
PYEOF
