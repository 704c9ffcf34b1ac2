"""ringtune's adapters in PyTorch + PEFT: load, numbers, merge (bench/peft_check.sh runs it).

Arguments: BASE (model folder) ADAPTER (PEFT folder ringtune wrote) MERGED (`ringtune merge`'s
output) DATA (chat JSONL) WORK (scratch folder). Writes WORK/batch.safetensors for
`ringtune forward-backward`, then, once the shell has run it, compares (`--compare`).
Exits 1 when a check fails.
"""
import json
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

warnings.simplefilter("ignore")
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.manual_seed(0)
base_dir, adapter_dir, merged_dir, data, work = sys.argv[1:6]
compare = "--compare" in sys.argv
tok = AutoTokenizer.from_pretrained(base_dir)
rows = [json.loads(line) for line in open(data)][:6]
seqs = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in rows]
seqs = [s["input_ids"] if isinstance(s, dict) else list(s) for s in seqs]
T = max(len(s) for s in seqs)
ids = torch.zeros(len(seqs), T, dtype=torch.int64)
weights = torch.zeros(len(seqs), T, dtype=torch.float32)
for i, s in enumerate(seqs):
    ids[i, : len(s)] = torch.tensor(s)
    # Varied per-token weights (what tinker's datums carry), 0 on the padding.
    weights[i, : len(s)] = torch.rand(len(s)) + 0.5
if not compare:
    save_file({"input_ids": ids, "loss_weights": weights}, f"{work}/batch.safetensors")
    sys.exit(0)

failed = []


def check(name, value, bound):
    ok = value <= bound
    print(f"| {name} | {value:.2e} | {bound:.0e} | {'pass' if ok else 'FAIL'} |")
    if not ok:
        failed.append(name)


print("| check | value | bound | |")
print("|---|---|---|---|")
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
embed0 = base.model.embed_tokens.weight.detach().clone()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
# Every tensor of the file is in the model, bit for bit.
sd = load_file(f"{adapter_dir}/adapter_model.safetensors")
live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
missing = [k for k in sd if k.replace(".weight", ".default.weight") not in live]
differ = [k for k in sd if k not in missing and not torch.equal(live[k.replace(".weight", ".default.weight")], sd[k])]
check(f"adapter tensors missing or different in PEFT (of {len(sd)})", len(missing) + len(differ), 0)
check("LoRA tensors in PEFT not in the file", len(live) - len(sd), 0)
# base_model_name_or_path leads PEFT to the base from this (another) working folder.
from peft import AutoPeftModelForCausalLM  # noqa: E402

auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
with torch.no_grad():
    gap = (auto(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
check("AutoPeftModelForCausalLM (base from the adapter's config) vs PeftModel, logits", gap, 0)
del auto

# Loss and gradients against `ringtune forward-backward` on the same batch.
for n, p in model.named_parameters():
    p.requires_grad_("lora_" in n)
logits = model(input_ids=ids).logits[:, :-1].float()
logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
w = weights[:, 1:]
loss = -(logp * w).sum() / w.sum()
loss.backward()
ours = json.load(open(f"{work}/fb.json"))
check("loss, relative", abs(loss.item() - ours["loss"]) / abs(loss.item()), 1e-5)
grads = load_file(f"{work}/grads.safetensors")
worst = 0.0
for n, p in model.named_parameters():
    if p.grad is None:
        continue
    key = n.replace(".default", "")
    g = grads[key]
    worst = max(worst, ((g - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item())
check(f"worst LoRA gradient, normwise relative ({len(grads)} tensors)", worst, 1e-4)

# ringtune merge's model against PEFT's base + adapter; PEFT's own merge for contrast.
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
with torch.no_grad():
    want = model(input_ids=ids).logits
    got = merged(input_ids=ids).logits
check("ringtune merge vs PEFT base + adapter, logits max abs", (got - want).abs().max().item(), 1e-3)
tied = base.config.tie_word_embeddings and any("lm_head" in k for k in sd)
if tied:
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).merge_and_unload()
    with torch.no_grad():
        peft_merged = pm(input_ids=ids).logits
    moved = (pm.model.embed_tokens.weight - embed0).abs().max().item()
    print(
        f"\nPEFT's own merge_and_unload() on this tied-embedding model with an lm_head adapter "
        f"(for contrast, not checked): input embeddings moved by up to {moved:.3g}, logits "
        f"off by up to {(peft_merged - want).abs().max().item():.3g} (README: In PEFT)."
    )
print("\nall checks pass" if not failed else f"\nFAILED: {', '.join(failed)}")
sys.exit(1 if failed else 0)
