#!/usr/bin/env bash
# The GPU check as one script: run it from a fresh GPU machine's checkout of this repository.
# Under 8 minutes when nothing needs installing (steps ~4-5 min on an H100-class machine, capped by --budget).
#
#   bash bench/gpu_check.sh                    # everything, results in gpu_check.json
#   bash bench/gpu_check.sh --out FILE         # the JSON elsewhere
#   bash bench/gpu_check.sh --dry-run          # print every command, write the JSON with every step
#                                              #   "skipped (dry run)"; works on a CPU-only machine, exit 0
#   bash bench/gpu_check.sh --budget 300       # seconds for the steps (default 420; installs not counted)
#   bash bench/gpu_check.sh --no-install       # report what is missing, install nothing
#   bash bench/gpu_check.sh --only label_fp32,label_8bit --workdir W   # rerun some steps (needs W's exports)
#
# 1. Environment: python, torch (+ CUDA), bitsandbytes, trl, pytest, the project itself. What is
#    missing is installed when it can be (`pip`, with a timeout; a machine without network just
#    reports it), otherwise it is recorded and the steps that need it are skipped with the reason.
#    torch: on a GPU machine keep the torch that is there, or let pip resolve the default wheel
#    (`pip install torch`, which on Linux x86_64 is a CUDA build). Do NOT run DEVELOPERS.md's
#    `pip install torch==2.13.0` there: that pin is for this project's CPU machines (the CPU wheel
#    from the CPU index) and would replace a working CUDA torch. The project is then installed with
#    the torch that is present held fixed (a pip constraint), so pip never swaps it.
# 2. Steps, each timed, each under its own `timeout`, each recorded as ok | failed | skipped (reason):
#    pytest_gpu       python -m pytest -q tests/test_gpu.py
#    make_ranker      a tiny TeacherRankSFT export (tiny-llama-h256) to label with
#    label_fp32       python -m kdlab label --accelerator gpu                      (reference scores)
#    label_bf16       python -m kdlab label --accelerator gpu --dtype bfloat16     (+ max |diff| vs fp32)
#    label_8bit       python -m kdlab label --accelerator gpu --quantization 8bit  (a refusal of
#                     quantized rankers by the loader is recorded as a finding, not a failure)
#    ketchup_teacher  the quickstart teacher (experiments/quickstart/ketchup_teacher.yaml), 20 GPU steps
#    ketchup_8bit     experiments/quickstart/ketchup.yaml with that teacher in 8-bit, 10 GPU steps
#                     (CE warm-up cut to 2 steps so that 8 are policy-gradient steps against the teacher)
#    rl_bench         python bench/rl_step_vs_trl.py --device cuda --steps 10
# 3. One JSON file (--out, default gpu_check.json): environment, installs, and per step the command,
#    status, seconds, exit code, figures parsed from its output and the tail of its log.
#    Exit status: 0 when no step failed (skips are not failures), 1 otherwise.

set -u

OUT="gpu_check.json"
DRY_RUN=0
INSTALL=1
BUDGET=420
WORK=""
ONLY=""                                  # --only a,b: run these steps, skip the others (reruns)
ACCEL="${GPU_CHECK_ACCELERATOR:-gpu}"   # cpu: only to exercise this script on a machine without a GPU
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --workdir) WORK="$2"; shift ;;
    --workdir=*) WORK="${1#--workdir=}" ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
[ -n "$WORK" ] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/kdlab-gpu-check.XXXXXX")"
mkdir -p "$WORK/steps" || exit 2
case "$WORK" in /*) ;; *) WORK="$PWD/$WORK" ;; esac
START=$(date +%s)

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1

PY=""
for cand in python python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    PY="$cand"; break
  fi
done
HAVE_TIMEOUT=0; command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# ------------------------------------------------------------------------------------ environment
# "key<TAB>value" lines in $WORK/env.tsv; installs and what is missing in $WORK/installs.tsv / missing.txt
: > "$WORK/env.tsv"; : > "$WORK/installs.tsv"; : > "$WORK/missing.txt"
env_set() { printf '%s\t%s\n' "$1" "$2" >> "$WORK/env.tsv"; }
missing() { echo "$1" >> "$WORK/missing.txt"; log "MISSING: $1"; }
pip_try() {  # pip_try LABEL ARGS...: one pip install under a timeout, recorded
  local label="$1"; shift
  local t0 rc; t0=$(date +%s)
  log "pip install $* ($label)"
  # --retries/--timeout: a machine without network fails in seconds, not minutes
  if [ "$HAVE_TIMEOUT" = 1 ]; then timeout 300 "$PY" -m pip install --retries 1 --timeout 20 "$@" > "$WORK/pip_$label.log" 2>&1; rc=$?
  else "$PY" -m pip install --retries 1 --timeout 20 "$@" > "$WORK/pip_$label.log" 2>&1; rc=$?; fi
  printf '%s\t%s\t%s\t%s\n' "$label" "pip install $*" "$rc" "$(( $(date +%s) - t0 ))" >> "$WORK/installs.tsv"
  [ $rc -eq 0 ] || log "pip install for $label failed (rc=$rc): $(tail -n 2 "$WORK/pip_$label.log" | tr '\n' ' ')"
  return $rc
}

# One Python process imports everything once (imports are the slow part) and prints
# "name<TAB>ok|missing<TAB>detail" lines; HAVE[name] / DETAIL[name] hold the answers.
declare -A HAVE DETAIL
probe() {
  HAVE=(); DETAIL=()
  [ -n "$PY" ] || return
  "$PY" - "$ROOT" > "$WORK/probe.tsv" 2> "$WORK/probe.err" <<'EOF'
import importlib, os, sys
root = os.path.realpath(sys.argv[1])
def line(name, ok, detail):
    print(f"{name}\t{'ok' if ok else 'missing'}\t{' '.join(str(detail).split())[:300]}", flush=True)
print(f"python\tok\t{sys.version.split()[0]} {sys.executable}")
try:
    import torch
    line("torch", True, f"{torch.__version__} (CUDA build {torch.version.cuda})")
    avail = torch.cuda.is_available()
    line("cuda", avail, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if avail else
         ("torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False (driver / device?)"))
except Exception as e:
    line("torch", False, f"{type(e).__name__}: {e}")
    line("cuda", False, "no torch")
for mod in ("bitsandbytes", "trl", "pytest", "lightning", "transformers", "peft", "sentence_transformers"):
    try:
        m = importlib.import_module(mod)
        line(mod, True, getattr(m, "__version__", "?"))
    except Exception as e:
        line(mod, False, f"{type(e).__name__}: {e}")
try:
    import kdlab, kdlab.callbacks  # kdlab.callbacks exists only in an installed kdlab
    here = os.path.realpath(kdlab.__file__).startswith(root)
    line("kdlab", here, f"{kdlab.__version__} {os.path.dirname(kdlab.__file__)}" + ("" if here else f" (not this checkout {root})"))
except Exception as e:
    line("kdlab", False, f"{type(e).__name__}: {e}")
EOF
  local name state detail
  while IFS=$'\t' read -r name state detail; do HAVE[$name]="$state"; DETAIL[$name]="$detail"; done < "$WORK/probe.tsv"
}
have() { [ "${HAVE[$1]:-missing}" = ok ]; }

probe_env() {
  env_set date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  env_set host "$(hostname 2>/dev/null || echo unknown)"
  env_set git_commit "$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    env_set nvidia_smi "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
  else
    env_set nvidia_smi "not found"
  fi
  if [ -z "$PY" ]; then missing "python >= 3.10 (nothing can run; install Python first)"; return; fi
  env_set pip "$("$PY" -m pip --version 2>&1 | head -n 1)"
  log "probing the Python environment (one process)"
  probe
  if [ "$INSTALL" = 1 ]; then
    local installed=0 mod pkg
    # torch: keep the torch that is there (a CUDA build on a GPU machine); with none, pip's default
    # wheel. NOT torch==2.13.0, the CPU pin of DEVELOPERS.md (see the header).
    if ! have torch; then pip_try torch torch || true; installed=1; probe; fi
    if have torch; then
      "$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$WORK/constraints.txt" 2>/dev/null
      if ! have kdlab; then  # the project, with the torch that is there held fixed
        pip_try project -c "$WORK/constraints.txt" -e ".[test,bench]" \
          || pip_try project_nodeps --no-deps --no-build-isolation -e . || true
        installed=1
      fi
      for mod in bitsandbytes trl pytest lightning transformers peft sentence_transformers; do
        if ! have "$mod"; then
          pkg="$mod"; [ "$mod" = sentence_transformers ] && pkg=sentence-transformers
          pip_try "$mod" -c "$WORK/constraints.txt" "$pkg" || true
          installed=1
        fi
      done
    fi
    if [ "$installed" = 1 ]; then log "probing again after installs"; probe; fi
  fi
  local name
  for name in python torch cuda bitsandbytes trl pytest lightning transformers peft sentence_transformers kdlab; do
    env_set "$name" "${HAVE[$name]:-missing}: ${DETAIL[$name]:-}"
    if ! have "$name"; then
      case "$name" in
        cuda) missing "a CUDA GPU usable by torch: ${DETAIL[cuda]:-no probe}" ;;
        kdlab) missing "the project (pip install -e '.[test,bench]' from the checkout; offline: pip install --no-deps --no-build-isolation -e .): ${DETAIL[kdlab]:-no probe}" ;;
        *) missing "$name: ${DETAIL[$name]:-not importable}" ;;
      esac
    fi
  done
}

cuda_ok() { [ "$ACCEL" = cpu ] || have cuda; }

# ------------------------------------------------------------------------------------ steps
# name | timeout (s) | what it needs (space-separated: cuda kdlab bnb trl pytest ranker teacher) | command
PY_CMD="${PY:-python}"
RANKER="$WORK/ranker"
DATA="kdlab/data/sample/ranking_val.jsonl"
STEPS=(pytest_gpu make_ranker label_fp32 label_bf16 label_8bit ketchup_teacher ketchup_8bit rl_bench)
declare -A TIMEOUT NEEDS CMD
TIMEOUT[pytest_gpu]=180; NEEDS[pytest_gpu]="cuda kdlab pytest bnb"
CMD[pytest_gpu]="$PY_CMD -m pytest -q -p no:cacheprovider tests/test_gpu.py"
TIMEOUT[make_ranker]=90; NEEDS[make_ranker]="kdlab"
CMD[make_ranker]="$PY_CMD -c 'import lightning as L; from kdlab.stages import TeacherRankSFT; L.seed_everything(0); TeacherRankSFT(backbone=\"tiny-llama-h256\").export_pretrained(\"$RANKER\"); print(\"exported\", \"$RANKER\")'"
TIMEOUT[label_fp32]=120; NEEDS[label_fp32]="cuda kdlab ranker"
CMD[label_fp32]="$PY_CMD -m kdlab label --teacher=$RANKER --input=$DATA --output=$WORK/label_fp32.jsonl --accelerator=$ACCEL --resume=false"
TIMEOUT[label_bf16]=120; NEEDS[label_bf16]="cuda kdlab ranker"
CMD[label_bf16]="$PY_CMD -m kdlab label --teacher=$RANKER --input=$DATA --output=$WORK/label_bf16.jsonl --accelerator=$ACCEL --dtype=bfloat16 --resume=false"
TIMEOUT[label_8bit]=120; NEEDS[label_8bit]="cuda kdlab bnb ranker"
CMD[label_8bit]="$PY_CMD -m kdlab label --teacher=$RANKER --input=$DATA --output=$WORK/label_8bit.jsonl --accelerator=$ACCEL --quantization=8bit --resume=false"
TIMEOUT[ketchup_teacher]=150; NEEDS[ketchup_teacher]="cuda kdlab"
CMD[ketchup_teacher]="$PY_CMD -m kdlab fit --config experiments/quickstart/ketchup_teacher.yaml --run.dir=$WORK/ketchup_teacher --trainer.accelerator=$ACCEL --trainer.devices=1 --trainer.max_steps=20 --trainer.limit_val_batches=0"
TIMEOUT[ketchup_8bit]=180; NEEDS[ketchup_8bit]="cuda kdlab bnb teacher"
CMD[ketchup_8bit]="$PY_CMD -m kdlab fit --config experiments/quickstart/ketchup.yaml --run.dir=$WORK/ketchup_8bit --teacher.backbone=$WORK/ketchup_teacher/model --teacher.quantization=8bit --trainer.accelerator=$ACCEL --trainer.devices=1 --trainer.max_steps=10 --model.init_args.ce_warmup_steps=2 --trainer.limit_val_batches=0 --grad_variance.every_n_steps=null"
TIMEOUT[rl_bench]=180; NEEDS[rl_bench]="cuda kdlab trl"
if [ "$ACCEL" = cpu ]; then RL_DEVICE=cpu; else RL_DEVICE=cuda; fi
CMD[rl_bench]="$PY_CMD bench/rl_step_vs_trl.py --device $RL_DEVICE --steps 10"

: > "$WORK/steps.tsv"   # name<TAB>status<TAB>seconds<TAB>rc<TAB>timeout
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/steps.tsv"; log "$1: $2 (${3}s)"; }

why_not() {  # why_not STEP: prints a skip reason, or nothing when the step can run
  local need
  for need in ${NEEDS[$1]}; do
    case "$need" in
      cuda) cuda_ok || { echo "no CUDA GPU visible to torch"; return; } ;;
      kdlab) { have kdlab && have lightning; } || { echo "the project is not installed"; return; } ;;
      bnb) have bitsandbytes || { echo "bitsandbytes missing"; return; } ;;
      trl) have trl || { echo "trl missing"; return; } ;;
      pytest) have pytest || { echo "pytest missing"; return; } ;;
      ranker) [ -f "$RANKER/kdlab_score_head.json" ] || { echo "no ranker export (make_ranker did not succeed)"; return; } ;;
      teacher) [ -f "$WORK/ketchup_teacher/model/config.json" ] || { echo "no KETCHUP teacher export (ketchup_teacher did not succeed)"; return; } ;;
    esac
  done
}

run_step() {
  local name="$1" t="${TIMEOUT[$1]}" cmd="${CMD[$1]}" reason left t0 rc
  echo "+ [$name] (timeout ${t}s) $cmd"
  echo "$cmd" > "$WORK/steps/$name.cmd"
  if [ "$DRY_RUN" = 1 ]; then record "$name" "skipped (dry run)" 0 "" "$t"; return; fi
  if [ -n "$ONLY" ] && ! [[ ",$ONLY," == *",$name,"* ]]; then record "$name" "skipped (not in --only)" 0 "" "$t"; return; fi
  reason="$(why_not "$name")"
  if [ -n "$reason" ]; then record "$name" "skipped ($reason)" 0 "" "$t"; return; fi
  left=$(( BUDGET - ($(date +%s) - STEPS_START) ))
  if [ "$left" -lt 20 ]; then record "$name" "skipped (time budget of ${BUDGET}s spent)" 0 "" "$t"; return; fi
  local capped=0
  if [ "$t" -gt "$left" ]; then t="$left"; capped=1; fi
  t0=$(date +%s)
  if [ "$HAVE_TIMEOUT" = 1 ]; then timeout -k 15 "$t" bash -c "$cmd" > "$WORK/steps/$name.log" 2>&1; rc=$?
  else bash -c "$cmd" > "$WORK/steps/$name.log" 2>&1; rc=$?; fi
  local secs=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then record "$name" ok "$secs" "$rc" "$t"
  elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ "$capped" = 1 ]; then
    record "$name" "skipped (cut after ${t}s: the --budget of ${BUDGET}s for all steps ran out)" "$secs" "$rc" "$t"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" "failed (timed out after ${t}s)" "$secs" "$rc" "$t"
  elif [ "$name" = label_8bit ] && [ $rc -eq 2 ] && grep -qiE "quantiz|8-?bit" "$WORK/steps/$name.log"; then
    record "$name" "skipped (finding: the loader refuses quantized rankers: $(grep -iE 'quantiz|8-?bit' "$WORK/steps/$name.log" | tail -n 1 | cut -c1-200 | tr -d '\t'))" "$secs" "$rc" "$t"
  else record "$name" failed "$secs" "$rc" "$t"; fi
  tail -n 3 "$WORK/steps/$name.log" | sed "s/^/    [$name] /"
}

# ------------------------------------------------------------------------------------ main
log "repo $ROOT, work dir $WORK, out $OUT, accelerator $ACCEL$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN')"
if [ "$DRY_RUN" = 1 ]; then
  env_set mode "dry run: environment not probed, nothing installed"
  echo "+ [env] probe python / torch+CUDA / bitsandbytes / trl / pytest / the project; when missing (and not --no-install):"
  echo "+ [env]   $PY_CMD -m pip install torch     (only if no torch at all: pip's default wheel, NOT torch==2.13.0)"
  echo "+ [env]   $PY_CMD -m pip install -c CONSTRAINTS(torch==<installed>) -e '.[test,bench]'"
else
  probe_env
fi
STEPS_START=$(date +%s)   # the step budget starts here: installs above are not counted
for s in "${STEPS[@]}"; do run_step "$s"; done

# ------------------------------------------------------------------------------------ the JSON
write_json() {
  "$PY" - "$WORK" "$OUT" "$DRY_RUN" "$START" "$ACCEL" <<'EOF'
import json, re, sys, time
from pathlib import Path

work, out, dry, start, accel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]

def rows(name):
    p = work / name
    return [line.split("\t") for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

def scores(path):
    try:
        return [d["teacher_score"] for line in Path(path).read_text().splitlines() if line.strip()
                for d in json.loads(line)["docs"]]
    except (OSError, ValueError, KeyError):
        return None

def figures(name, text, seconds):
    f = {}
    if name == "pytest_gpu":
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text):
            f[what] = int(n)
    elif name.startswith("label_"):
        m = re.search(r"wrote (\d+) \S+ groups", text)
        s = scores(work / f"{name}.jsonl")
        if m:
            f["groups"] = int(m.group(1))
        if s:
            f["pairs"] = len(s)
            f["pairs_per_s_end_to_end"] = round(len(s) / max(seconds, 1), 1)
            ref = scores(work / "label_fp32.jsonl")
            if ref and name != "label_fp32" and len(ref) == len(s):
                f["max_abs_diff_vs_fp32"] = max(abs(a - b) for a, b in zip(s, ref))
    elif name.startswith("ketchup"):
        run = work / name
        manifest = next(iter(sorted(run.glob("**/manifest.json"))), None) if run.exists() else None
        if manifest:
            try:
                f["manifest_status"] = json.loads(manifest.read_text()).get("status")
            except ValueError:
                pass
        f["exported_model"] = (run / "model" / "config.json").is_file()
        try:
            metrics = json.loads((run / "metrics.json").read_text())
            f["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} if isinstance(metrics, dict) else metrics
        except (OSError, ValueError):
            pass
        losses = re.findall(r"train/loss\S*\s*[=:]\s*([-\d.eE]+)", text)
        if losses:
            f["last_train_loss"] = float(losses[-1])
    elif name == "rl_bench":
        for line in text.splitlines():
            if line.strip().startswith("ratio kdlab/TRL"):
                f["ratio_line"] = line.strip()
                m = re.search(r"step tokens/s ([\d.]+)x\s+generation-only ([\d.]+)x", line)
                if m:
                    f["ratio_step_tokens_per_s"], f["ratio_generation_only"] = float(m.group(1)), float(m.group(2))
            elif "tokens/s" in line and "step median" in line:
                f.setdefault("lines", []).append(line.strip())
    return f

steps = []
for name, status, seconds, rc, timeout in rows("steps.tsv"):
    log = work / "steps" / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    cmd = work / "steps" / f"{name}.cmd"
    secs = int(seconds or 0)
    step = {"name": name, "status": status, "seconds": secs, "rc": int(rc) if rc else None, "timeout_s": int(timeout),
            "command": cmd.read_text().strip() if cmd.exists() else ""}
    if text:
        step["figures"] = figures(name, text, secs)
        step["log_tail"] = text[-1500:]
    steps.append(step)

result = {
    "script": "bench/gpu_check.sh", "dry_run": dry, "accelerator": accel, "work_dir": str(work),
    "env": {k: v for k, v in (r[:2] for r in rows("env.tsv") if len(r) >= 2)},
    "installs": [{"what": r[0], "command": r[1], "rc": int(r[2]), "seconds": int(r[3])} for r in rows("installs.tsv")],
    "missing": [line for line in (work / "missing.txt").read_text().splitlines() if line] if (work / "missing.txt").exists() else [],
    "steps": steps,
    "summary": {s: sum(1 for st in steps if st["status"].split(" ")[0] == s) for s in ("ok", "failed", "skipped")},
    "total_seconds": int(time.time()) - start,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result["summary"]))
EOF
}

if [ -n "$PY" ]; then
  write_json || { echo "gpu_check.sh: could not write $OUT" >&2; exit 1; }
else  # no Python at all: a minimal JSON by hand
  {
    printf '{"script": "bench/gpu_check.sh", "dry_run": %s, "missing": ["python >= 3.10"], "steps": [' \
      "$([ "$DRY_RUN" = 1 ] && echo true || echo false)"
    sep=""
    while IFS=$'\t' read -r name status _; do printf '%s{"name": "%s", "status": "%s"}' "$sep" "$name" "$status"; sep=", "; done < "$WORK/steps.tsv"
    printf ']}\n'
  } > "$OUT"
fi
log "wrote $OUT"
if [ "$DRY_RUN" = 1 ]; then exit 0; fi
if cut -f2 "$WORK/steps.tsv" | grep -q '^failed'; then exit 1; fi
exit 0
