#!/usr/bin/env bash
# Two commits side by side: bench/e2e.py --quick --modes async, interleaved (old, new, old, new, ...) on one SFT'd
# policy, then one run each with the driver-bytes hook (bench/driver_bytes/). OLD and NEW are checkouts with their
# own .venv (`make install`); OLD runs NEW's bench/e2e.py (as bench/e2e_cmp.py in OLD, its module paths mapped
# back when OLD predates the rooms of cluster/, 45ec468), so both report the same figures.
#
#   bash bench/compare_commits.sh OLD_DIR NEW_DIR OUT_DIR [ROUNDS]
set -eu
OLD=$(realpath "$1"); NEW=$(realpath "$2"); OUT=$(realpath -m "$3"); ROUNDS=${4:-3}
HERE=$NEW/bench
mkdir -p "$OUT/work"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
map='s/cluster\.dev\.tiny_models/cluster.tiny_models/; s/cluster\.driver\.validation/cluster.validation/;
     s/cluster\.pools\.topology/cluster.topology/; s/cluster\.driver\.state/cluster.driver_state/'
if [ -d "$OLD/cluster/pools" ]; then cp "$NEW/bench/e2e.py" "$OLD/bench/e2e_cmp.py"; else sed -e "$map" "$NEW/bench/e2e.py" > "$OLD/bench/e2e_cmp.py"; fi
POLICY="$OUT/work/models/sft-policy"
[ -f "$POLICY/config.json" ] || (cd "$NEW" && .venv/bin/python bench/e2e.py --quick --modes async --rounds 1 \
  --work "$OUT/work" --out "$OUT/warm.json")
run() {  # side dir tag [env...]: OLD runs the mapped copy, NEW its own bench/e2e.py
  local side=$1 dir=$2 tag=$3 script=bench/e2e.py; shift 3
  [ "$side" = old ] && script=bench/e2e_cmp.py
  (cd "$dir" && env "$@" .venv/bin/python "$script" --quick --modes async --rounds 1 --policy "$POLICY" \
    --work "$OUT/work/$side-$tag" --out "$OUT/$side-$tag.json") > "$OUT/$side-$tag.log" 2>&1
  echo "$side $tag done"
}
for r in $(seq 1 "$ROUNDS"); do run old "$OLD" "r$r" X=1; run new "$NEW" "r$r" X=1; done
for side in old new; do
  dir=$OLD; [ $side = new ] && dir=$NEW
  run $side "$dir" bytes PYTHONPATH="$HERE/driver_bytes" SEGR1_BYTES_OUT="$OUT/bytes-$side"
done
python3 - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
sps = {s: [json.load(open(f))["async"]["samples_per_s"] for f in sorted(glob.glob(f"{out}/{s}-r*.json"))] for s in ("old", "new")}
steps = {s: json.load(open(f"{out}/{s}-bytes.json"))["config"]["steps"] for s in ("old", "new")}
tally = {s: json.load(open(sorted(glob.glob(f"{out}/bytes-{s}.*.json"))[-1])) for s in ("old", "new")}
per_step = {s: {k: round(v / steps[s]) for k, v in tally[s].items() if k.endswith("bytes")} for s in tally}
summary = {"samples_per_s": sps, "mean_ratio_new_old": sum(sps["new"]) / len(sps["new"]) / (sum(sps["old"]) / len(sps["old"])),
           "best_ratio_new_old": max(sps["new"]) / max(sps["old"]), "driver_bytes_per_step": per_step}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
