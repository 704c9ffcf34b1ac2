#!/usr/bin/env bash
# ringtune's adapters in PyTorch + PEFT (README: In PEFT): trains the quickstart in one
# process, loads its adapter with PEFT, compares the loss and every LoRA gradient with
# `ringtune forward-backward` on the same batch (chat-template tokens, random per-token
# weights), and `ringtune merge`'s model with PEFT's base + adapter. Prints a table; exits 1
# when a check fails. Not part of `cargo test` (it needs torch + transformers + peft).
#
# Environment: PY (python with torch+transformers+peft; default
# ~/.cache/ringtune-bench-venv/bin/python), BIN (default target/release/ringtune), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/ringtune-bench-venv/bin/python}
[ -x "$PY" ] || { echo "no python at $PY (set PY=...)" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p ringtune
BIN=${BIN:-$PWD/target/release/ringtune}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RUST_BACKTRACE=0

echo "training the quickstart (one process)..." >&2
# In the scratch folder, with the config's relative paths, as a user runs it: the adapter's
# base_model_name_or_path must still lead PEFT to the base from here.
ln -s "$PWD/datasets" "$work/datasets"
(cd "$work" && "$BIN" train "$OLDPWD/configs/quickstart.toml" --plain --set nodes=1) \
  2>"$work/train.log" || { cat "$work/train.log" >&2; exit 1; }
adapter=$(ls -d "$work"/runs/quickstart/checkpoints/step-*/adapter | sort -V | tail -1)
model="$work/runs/models/quickstart"
# Everything after training runs from another, empty folder.
repo=$PWD
mkdir "$work/elsewhere" && cd "$work/elsewhere"
"$BIN" merge "$adapter" --out "$work/merged" 2>"$work/merge.log" \
  || { cat "$work/merge.log" >&2; exit 1; }
"$PY" "$repo/bench/peft_check.py" "$model" "$adapter" "$work/merged" \
  "$repo/datasets/quickstart_chat_eval.jsonl" "$work"
"$BIN" forward-backward --model "$model" --adapter "$adapter" \
  --batch "$work/batch.safetensors" --grads-out "$work/grads.safetensors" >"$work/fb.json"
echo "ringtune's adapter $adapter in PEFT:"
"$PY" "$repo/bench/peft_check.py" "$model" "$adapter" "$work/merged" \
  "$repo/datasets/quickstart_chat_eval.jsonl" "$work" --compare
