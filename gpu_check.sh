#!/usr/bin/env bash
# The GPU check: one call of at most 8 minutes on one GPU, with nothing downloaded.
#
#   bash gpu_check.sh                       # on a GPU machine (the figures go to $OUT, default /tmp/gpu_check)
#   GPU_CHECK_CPU=1 GPU_CHECK_SECONDS=900 bash gpu_check.sh   # the dry run: the same steps on a CPU, small shapes
#
# 1. the tests of the memory, routing and model paths (torch sees CUDA; the tests' tiny models run
#    on the CPU)
# 2. bench.py at LLaMA-2-7B shapes (dim 4096, FFN 11008, 32 heads, vocab 32000, 4 layers, random
#    weights, bf16): train step, prefill, decode, peak memory of TeamLoRA k4 r32 against MoELoRA k4
#    r32 and LoRA r128 (and the rest of its group), then memory.py's prediction beside each peak
# 3. three train.py steps of every method with bf16 on a random-weight base of a reduced 7B-like
#    shape (written here by model.Transformer.save_pretrained, a tokenizer trained here), then
#    --compile, then --fsdp under torchrun (one process per GPU present)
# Each step has its own time limit, all of them within one deadline of 7.5 minutes; a step that
# fails or runs out of time is reported and the next one runs. summary.txt collects the lines.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))  # the CPU dry run: compiling alone takes minutes there
cap() { local left=$((DEADLINE - SECONDS)); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }  # seconds for a step
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/summary.txt"; }
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    DEVICE=(--device cpu); NPROC=1; COMPILE_LIMIT=400
    BENCH=(--dim 64 --hidden 96 --layers 1 --heads 4 --vocab 128 --batch 2 --seq 16 --new-tokens 2 --repeats 1)
    SHAPE="dim=64 n_layers=2 n_heads=4 hidden_dim=96"; TRAIN=(--batch-size 2 --seq-len 256)
else
    DEVICE=(); NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
    BENCH=(--repeats 3)
    SHAPE="dim=4096 n_layers=4 n_heads=32 hidden_dim=11008"; TRAIN=(--batch-size 4 --seq-len 512)
fi
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no GPU: the CPU dry run')" | tee "$OUT/summary.txt"

log "1. tests"
timeout "$(cap 90)" python -m pytest -q -x tests/test_memory.py tests/test_teamlora.py tests/test_model.py 2>&1 \
    | tail -3 | tee -a "$OUT/summary.txt"

log "2. bench.py, bf16: TeamLoRA k4 r32 vs MoELoRA k4 r32 vs LoRA r128"
timeout "$(cap 150)" python bench.py --experts 4 --rank 32 --dtype bfloat16 "${DEVICE[@]}" "${BENCH[@]}" \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1 || log "bench FAILED or out of time (rc $?): $(tail -2 "$OUT/bench.txt")"
grep -E "^(model mode|k=|method|-|LoRA r|MoELoRA k4 r32 +\||HydraLoRA k4 r32 +\||TeamLoRA)" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
[ -f "$OUT/bench.json" ] && python - "$OUT/bench.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
import memory
from model import ModelArgs
bench = json.load(open(sys.argv[1]))
a = bench["args"]
args = ModelArgs(dim=a["dim"], n_layers=a["layers"], n_heads=a["heads"], n_kv_heads=a["kv_heads"],
                 vocab_size=a["vocab"], hidden_dim=a["hidden"], tie_embeddings=a["tied"])
for label, setup in {"LoRA r128": ("lora", 128, 1), "MoELoRA k4 r32": ("moelora", 32, 4),
                     "HydraLoRA k4 r32": ("hydralora", 32, 4), "TeamLoRA k4 r32": ("teamlora", 32, 4)}.items():
    p = memory.peak(args, *setup, world=1, batch_size=a["batch"], seq_len=a["seq"], dropout=a["dropout"])
    predicted = (p["total"] - p["ddp buckets"]) / 2**20  # bench runs one process, no DDP
    measured = bench["rows"][label]["train_memory_mib"]
    print(f"peak {label}: bench {measured:.4g} MiB, memory.py {predicted:.4g} MiB ({predicted / measured:.2f}x)")
EOF

log "3. train.py steps on a random-weight base ($SHAPE)"
BASE="$OUT/base"
python - "$BASE" "$SHAPE" <<'EOF'
import sys
import data
from model import ModelArgs, Tokenizer, Transformer
path, shape = sys.argv[1], dict(kv.split("=") for kv in sys.argv[2].split())
train, _ = data.load_mixture()  # a tokenizer trained on the built-in mixture: no download
texts = [f"{ex.instruction}\n{ex.input}\n{ex.output}" for ex in train[::20]]
tok = Tokenizer(data.train_tokenizer(texts, f"{path}/tokenizer", vocab_size=512))
args = ModelArgs(**{k: int(v) for k, v in shape.items()}, vocab_size=tok.n_words, max_seq_len=1024)
Transformer(args).save_pretrained(path)
EOF
STEPS=(--base "$BASE" --max-steps 3 --grad-accum 2 --task-cap 64 --no-eval --save-every 0 --dtype bfloat16 --overwrite
       "${TRAIN[@]}" "${DEVICE[@]}")
step() {  # step NAME LIMIT COMMAND...: run it, log its last step's loss or its failure
    local name=$1 limit=$2; shift 2
    if timeout "$(cap "$limit")" "$@" --out "$OUT/runs/$name" > "$OUT/train-$name.txt" 2>&1; then
        log "train $name: $(python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; \
print(f\"step {r['step']} loss {r['loss']:.4f} grad_norm {r['grad_norm']:.3f} {r['tokens_per_s']:.0f} tokens/s\")" \
            "$OUT/runs/$name/log.jsonl")"
    else
        log "train $name FAILED or out of time (rc $?): $(tail -2 "$OUT/train-$name.txt")"
    fi
}
for method in lora moelora hydralora teamlora full; do
    step "$method" 45 python train.py --method "$method" "${STEPS[@]}"
done
step teamlora-compile "${COMPILE_LIMIT:-120}" python train.py --method teamlora --compile "${STEPS[@]}"
if python train.py --help | grep -q -- "--fsdp"; then
    for method in teamlora full; do
        step "fsdp-$method" 60 torchrun --standalone --nproc_per_node "$NPROC" train.py --fsdp --method "$method" "${STEPS[@]}"
    done
else
    log "train --fsdp: SKIPPED, this train.py has no --fsdp flag"
fi
log "done in ${SECONDS} s: $OUT/summary.txt"
