#!/usr/bin/env bash
# The last table of check.sh: ringtune's tokens/s and peak memory (default attention, and
# the flash kernels) next to PyTorch + PEFT's, per preset, from the outputs check.sh wrote
# in DIR (gpu_check.txt, gpu_check_flash.txt, torch.txt). Missing numbers print as "-".
#   bash deploy/gpu/side_by_side.sh [DIR]
set -u
dir="${1:-./gpu-check-out}"

# "tokens/s peak-GiB" of a preset's row in a gpu_check summary table.
ringtune_row() {
  awk -F'|' -v p="$2" '
    $2 == " " p " " && NF >= 14 {
      t = $9; m = $12; gsub(/ /, "", t); gsub(/ /, "", m); print t, m; exit
    }' "$1" 2>/dev/null
}

# "tokens/s peak-GiB" of a preset's JSON line from gpu_peft_bench.py.
torch_row() {
  grep -o "{\"preset\": \"$2\"[^}]*}" "$1" 2>/dev/null | head -1 \
    | sed -E 's/.*"tokens_per_s": ([0-9.eE+-]+).*"peak_mem_gib": ([0-9.eE+-]+).*/\1 \2/'
}

echo "| preset | ringtune tokens/s | ringtune, flash attention | PyTorch + PEFT | best ringtune / PyTorch | peak GiB ringtune / PyTorch |"
echo "|---|---|---|---|---|---|"
for p in qwen05b llama1b; do
  read -r rt rm <<<"$(ringtune_row "$dir/gpu_check.txt" "$p")"
  read -r ft fm <<<"$(ringtune_row "$dir/gpu_check_flash.txt" "$p")"
  read -r pt pm <<<"$(torch_row "$dir/torch.txt" "$p")"
  awk -v p="$p" -v rt="${rt:--}" -v ft="${ft:--}" -v pt="${pt:--}" -v rm="${rm:--}" \
      -v fm="${fm:--}" -v pm="${pm:--}" 'BEGIN {
    best = (rt ~ /^[0-9.]+$/) ? rt + 0 : -1
    if (ft ~ /^[0-9.]+$/ && ft + 0 > best) best = ft + 0
    ratio = (best > 0 && pt ~ /^[0-9.]+$/ && pt + 0 > 0) ? sprintf("%.2fx", best / pt) : "-"
    ptf = (pt ~ /^[0-9.]+$/) ? sprintf("%.0f", pt) : pt
    pmf = (pm ~ /^[0-9.]+$/) ? sprintf("%.1f", pm) : pm
    printf "| %s | %s | %s | %s | %s | %s (default), %s (flash) / %s |\n", p, rt, ft, ptf, ratio, rm, fm, pmf
  }'
done
