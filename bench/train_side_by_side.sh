#!/usr/bin/env bash
# LoRA training throughput, ringtune vs PyTorch + PEFT, side by side on this machine.
#
# Runs `ringtune bench train --json` and ../shared/bench/lora_train_torch.py for each
# preset, same shapes (batch x 256 tokens, LoRA r=32 on the 7 projections, AdamW, half the
# targets weighted), same thread count, alternating ringtune/PyTorch for ROUNDS rounds, and
# prints one table. Machines shared with other work are noisy: compare the ratio from one
# run, not absolute numbers from different days.
#
# Environment: PRESETS ("tiny smol"), THREADS (2), STEPS (10), WARMUP (3), ROUNDS (1),
# PY (python with torch+transformers+peft; default ~/.cache/ringtune-bench-venv/bin/python),
# TORCH_SCRIPT (default ../shared/bench/lora_train_torch.py next to the checkout),
# OMP_WAIT_POLICY for PyTorch (default PASSIVE: spin-waiting OpenMP threads make PyTorch
# several times slower whenever anything else runs on the machine), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESETS=${PRESETS:-"tiny smol"}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-1}
PY=${PY:-$HOME/.cache/ringtune-bench-venv/bin/python}
TORCH_SCRIPT=${TORCH_SCRIPT:-../shared/bench/lora_train_torch.py}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

[ -x "$PY" ] || { echo "no python at $PY (set PY=...)" >&2; exit 1; }
[ -f "$TORCH_SCRIPT" ] || { echo "no $TORCH_SCRIPT (set TORCH_SCRIPT=...)" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p ringtune
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for r in $(seq 1 "$ROUNDS"); do
  for p in $PRESETS; do
    echo "round $r: $p ringtune..." >&2
    ./target/release/ringtune bench train --preset "$p" --threads "$THREADS" --steps "$STEPS" \
      --warmup "$WARMUP" --json > "$out/rt-$p-$r.json"
    echo "round $r: $p pytorch..." >&2
    "$PY" "$TORCH_SCRIPT" --preset "$p" --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" \
      --out-json "$out/pt-$p-$r.json" > /dev/null 2> "$out/pt-$p-$r.log" || { cat "$out/pt-$p-$r.log" >&2; exit 1; }
  done
done

python3 - "$out" "$THREADS" <<'PY'
import glob, json, os, platform, sys, time
out, threads = sys.argv[1], sys.argv[2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} CPUs, {threads} threads, "
      f"loadavg now {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
print("| preset | round | ringtune tokens/s | PyTorch tokens/s | ratio | ringtune peak RSS | PyTorch peak RSS | matmul 1024³ GFLOP/s candle / torch | PyTorch loadavg |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(f"{out}/rt-*.json")):
    p, r = os.path.basename(f)[3:-5].rsplit("-", 1)
    rt = json.load(open(f))
    pt = json.load(open(f"{out}/pt-{p}-{r}.json"))
    ratio = rt["tokens_per_s"] / pt["tokens_per_s_median"]
    print(f"| {p} (B={rt['batch']}, T={rt['seq']}) | {r} | {rt['tokens_per_s']:.0f} | {pt['tokens_per_s_median']:.0f} | "
          f"{ratio:.2f}x | {rt['peak_rss_bytes'] / 2**20:.0f} MiB | {pt['peak_rss_MiB']:.0f} MiB | "
          f"{rt['matmul1024_gflops_before']:.0f} / {pt['matmul1024_gflops_before']:.0f} | {pt['loadavg'][0]:.1f} |")
PY
