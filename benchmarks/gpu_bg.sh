#!/usr/bin/env bash
# A long part of gpu_job.sh run in the background of the device machine, so that a fit keeps its
# GPU between device commands (and the seconds a resume costs are not spent again):
#
#   BG_LIMIT=3000 JOBS=fit:0 ... bash benchmarks/gpu_bg.sh part14   # the same command every call
#
# The first call copies this tree to $BG/repo and starts `gpu_job.sh PART` there in its own
# session (setsid), with LIMIT=BG_LIMIT and OUT=$BG/out; every call starts it again if it is not
# running and has not ended (it resumes from its checkpoints, as a part called again does), waits
# up to WAIT seconds for it to end, shows the logs' last lines and, once it has ended, copies
# $BG/out into this call's $OUT. While it waits it keeps a copy of the records and fits.tar so far
# in $OUT/partial (every 5 s), removed when the call returns: a call killed at the session's
# device limit still brings back the sizes already recorded. The environment (JOBS, TEXTS,
# RECORD_EXTRA, ...) passes through, but PYTHONPATH, which is /tmp/site (the staged wheels) and
# the copy.
set -uo pipefail
part="${1:?usage: gpu_bg.sh PART (a part of gpu_job.sh)}"
BG="${BG:-/root/bg}" WAIT="${WAIT:-560}" OUT="${OUT:?OUT, the folder a device command brings back}"
[[ "$WAIT" =~ ^[0-9]+$ ]] || { echo "WAIT must be whole seconds, got '$WAIT'"; exit 2; }
mkdir -p "$BG/out"
if [[ ! -d "$BG/repo" ]]; then
  rm -rf "$BG/repo.tmp" && mkdir -p "$BG/repo.tmp" \
    && tar --exclude=./.device --exclude=./.carry --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C "$BG/repo.tmp" \
    && mv "$BG/repo.tmp" "$BG/repo" || { echo "[gpu_bg] could not copy the tree to $BG/repo"; exit 2; }
fi
# running: the process this folder started (its pid in $BG/pid) is alive; a part that another folder or
# another run on the machine started is not this one's
running() { [[ -f "$BG/pid" ]] && kill -0 "$(cat "$BG/pid")" 2> /dev/null; }
if [[ ! -f "$BG/rc" ]] && ! running; then
  echo "[gpu_bg] $(date +%T) starting gpu_job.sh $part in $BG/repo"
  ( cd "$BG/repo" && export OUT="$BG/out" LIMIT="${BG_LIMIT:-3000}" PYTHONPATH="/tmp/site:$BG/repo" \
      && setsid nohup bash -c "echo \$\$ > '$BG/pid'; bash benchmarks/gpu_job.sh $part; echo \$? > '$BG/rc'" \
         >> "$BG/bg.log" 2>&1 < /dev/null & )
fi
mirror() {  # the records and fits.tar so far, for a call killed before it returns
  rm -rf "$OUT/partial.tmp" && mkdir -p "$OUT/partial.tmp" \
    && { [[ ! -d "$BG/out/records" ]] || cp -r "$BG/out/records" "$OUT/partial.tmp/"; } \
    && { [[ ! -f "$BG/out/fits.tar" ]] || cp "$BG/out/fits.tar" "$OUT/partial.tmp/"; } \
    && rm -rf "$OUT/partial" && mv "$OUT/partial.tmp" "$OUT/partial"
}
end=$(( $(date +%s) + WAIT ))
while [[ ! -f "$BG/rc" ]] && (( $(date +%s) < end )); do sleep 5; mirror; done
rm -rf "$OUT/partial" "$OUT/partial.tmp"
for log in "$BG"/out/*.log "$BG/bg.log"; do [[ -f "$log" ]] && { echo "== $log"; tail -n "${TAIL:-3}" "$log"; }; done
if [[ -f "$BG/rc" ]]; then
  echo "[gpu_bg] $(date +%T) gpu_job.sh $part ended: rc $(cat "$BG/rc")"; cp -r "$BG/out/." "$OUT/"
else
  echo "[gpu_bg] $(date +%T) gpu_job.sh $part still running"
fi
