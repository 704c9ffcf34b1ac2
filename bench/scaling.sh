#!/usr/bin/env bash
# Data-parallel scaling on this machine: the tiny preset (hidden 256, 4 layers, vocab 32000,
# LoRA r=32 on the 7 projections), 8 examples x 256 tokens per node per step, one compute
# thread per node. Runs, back to back:
#   1 node  — `ringtune train` with nodes = 1 (the one-process trainer, RAYON_NUM_THREADS=1)
#   2 nodes — `ringtune train` with nodes = 2 (coordinator + 2 node processes, QUIC ring)
# and prints one table from the runs' metrics.jsonl (steps after WARMUP): tokens/s, seconds
# per step, and for the distributed run the slowest rank's compute and all-reduce time.
# Global batch: 8 (1 node) and 16 (2 nodes), the same per-node batch, as weak scaling is
# measured. A loaded machine makes the ratio meaningless: the table prints the load average.
#
# Environment: STEPS (12), WARMUP (2), ROUNDS (1), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-1}
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p ringtune
bin=$PWD/target/release/ringtune
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$bin" init-model --preset tiny --vocab-size 32000 --out "$out/model" > /dev/null
# Long lines of random words, truncated to exactly 256 tokens by the config.
python3 - "$out/train.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
alphabet = "abcdefghijklmnopqrstuvwxyz"
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        text = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(600))
        f.write(json.dumps({"text": text}) + "\n")
PY

config() { # nodes batch dir
  cat > "$3.toml" <<EOF
output_dir = "$3"
seed = 0
nodes = $1
[model]
path = "$out/model"
[data]
train = "$out/train.jsonl"
eval_fraction = 0.0
max_length = 257
overlong = "truncate"
[lora]
rank = 32
alpha = 32
dropout = 0.0
[train]
batch_size = $2
micro_batch_tokens = 4096
max_steps = $STEPS
save_every = 0
eval_every = 0
EOF
  echo "$3.toml"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r: 1 node..." >&2
  RAYON_NUM_THREADS=1 "$bin" train "$(config 1 8 "$out/w1-$r")" --plain 2> "$out/w1-$r.log" \
    || { cat "$out/w1-$r.log" >&2; exit 1; }
  echo "round $r: 2 nodes..." >&2
  "$bin" train "$(config 2 16 "$out/w2-$r")" --plain 2> "$out/w2-$r.log" \
    || { cat "$out/w2-$r.log" >&2; exit 1; }
done

python3 - "$out" "$ROUNDS" "$WARMUP" <<'PY'
import json, os, platform, sys, time
out, rounds, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} CPUs, loadavg now {os.getloadavg()[0]:.1f}")
print("| round | nodes | tokens/step | s/step | tokens/s | compute s (slowest rank) | all-reduce s (slowest rank) | ratio |")
print("|---|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    base = None
    for w in (1, 2):
        recs = [json.loads(l) for l in open(f"{out}/w{w}-{r}/metrics.jsonl")]
        recs = [x for x in recs if x["step"] > warmup]
        tokens = sum(x["tokens"] for x in recs)
        secs = sum(x.get("wall_s") or x["tokens"] / x["tokens_per_s"] for x in recs)
        tps = tokens / secs
        comp = sum(x.get("compute_s_max", 0) for x in recs) / len(recs)
        comm = sum(x.get("comm_s_max", 0) for x in recs) / len(recs)
        split = (f"{comp:.3f} | {comm:.3f}" if w > 1 else "— | —")
        base = base or tps
        print(f"| {r} | {w} | {tokens / len(recs):.0f} | {secs / len(recs):.3f} | {tps:.0f} | {split} | {tps / base:.2f} |")
PY
