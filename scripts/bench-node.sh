# shellcheck shell=bash
# The Node.js runtime step of scripts/bench (sourced by it; uses its GEN0, GEN1, GEN1_SIZE,
# REPODIR, SHM, WORK, LOGDIR, GV_ENCRYPTION, timed, sample, put, log, warm_input,
# drop_caches, verify_restore, dd_read and wait_for_file). It runs the checkout's build
# (dist/cli/main.js) on two runtimes, the pinned one (scripts/runtime) and an older one
# (BENCH_NODE_OLD, default /usr/bin/node when its major version differs), in alternating
# rounds: old new, new old, ... so that a slow minute lands on both. Each round and
# runtime: a fresh repository, first and next-day backup, a cold restore of gen1 (checked),
# a cold `list` (start-up) and a cold dd of gen1 through a mount. Medians are reported.
# BENCH_NODE=0 skips it; BENCH_NODE_ROUNDS sets the rounds (default BENCH_BACKUP_REPS).

# LABEL -> the genvault command on that runtime, as an installed wrapper runs it: each with
# the young-generation cap measured best for it (Node.js 20: 4 MiB, 24: 1 MiB; native-notes/
# performance.md).
node_cmd() {
	if [[ $1 == old ]]; then
		printf '%s\n' "$NODE_OLD" "--max-semi-space-size=${BENCH_NODE_OLD_SEMI:-4}" "$NODE_MAIN"
	else
		printf '%s\n' "$NODE_NEW" --max-semi-space-size=1 "$NODE_MAIN"
	fi
}

node_round() { # LABEL
	local label=$1 tool=node-$1 repo=$REPODIR/node-$1 mnt=$WORK/mnt-node-$1 file=$SHM/node.img
	local -a gv
	mapfile -t gv < <(node_cmd "$label")
	rm -rf -- "$repo"
	"${gv[@]}" -r "$repo" init --encryption "$GV_ENCRYPTION" >"$LOGDIR/$tool-init.log" 2>&1 || {
		log "  $tool init failed: $(tail -n 1 "$LOGDIR/$tool-init.log")"
		return 1
	}
	warm_input "$GEN0"
	timed "$tool" b_gen0 -- "${gv[@]}" -r "$repo" backup "$GEN0" --name vm1 && sample "$tool" b_gen0
	warm_input "$GEN1"
	timed "$tool" b_gen1 -- "${gv[@]}" -r "$repo" backup "$GEN1" --name vm1 && sample "$tool" b_gen1
	drop_caches
	timed "$tool" r_gen1 -- "${gv[@]}" -r "$repo" restore vm1@latest "$file" && sample "$tool" r_gen1
	verify_restore "$tool" "$file" || put "$tool" restore_bad 1
	drop_caches
	timed "$tool" list -- "${gv[@]}" -r "$repo" list && sample "$tool" list
	mkdir -p "$mnt"
	if timeout 120 "${gv[@]}" -r "$repo" mount "$mnt" >"$LOGDIR/$tool-mount.log" 2>&1 && wait_for_file "$mnt/vm1/latest" 30; then
		dd_read "$tool" "$mnt/vm1/latest" && NODE_DD[$label]+="${NODE_DD[$label]:+ }$(awk -v t="$tool" '$1 == t && $2 == "dd_mbps" {v = $3} END {print v}' "$RESULTS")"
		local pid
		pid=$(pgrep -f -- "mount $mnt" | head -n 1 || true)
		[[ -n $pid && -r /proc/$pid/status ]] && put "$tool" mount_rss_kib "$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")"
	fi
	mountpoint -q "$mnt" && { "${gv[@]}" umount "$mnt" >>"$LOGDIR/$tool-mount.log" 2>&1 || fusermount -uz "$mnt"; }
	log "  $tool: gen0 ${SAMPLES["$tool b_gen0"]##* } s, gen1 ${SAMPLES["$tool b_gen1"]##* } s, restore ${SAMPLES["$tool r_gen1"]##* } s, list ${SAMPLES["$tool list"]##* } s"
	rm -rf -- "$repo"
}

run_node() {
	[[ ${BENCH_NODE:-1} == 1 ]] || return 0
	local root r
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	NODE_MAIN=$root/dist/cli/main.js
	NODE_NEW=${GENVAULT_NODE:-}
	NODE_OLD=${BENCH_NODE_OLD:-/usr/bin/node}
	if [[ ! -x $NODE_NEW || ! -x $NODE_OLD || ! -f $NODE_MAIN ]]; then
		log "== node runtimes: skipped (need the pinned runtime, $NODE_OLD and $NODE_MAIN)"
		return 0
	fi
	local vnew vold
	vnew=$("$NODE_NEW" --version) vold=$("$NODE_OLD" --version)
	if [[ ${vnew%%.*} == "${vold%%.*}" ]]; then
		log "== node runtimes: skipped ($NODE_OLD is $vold, the same major as the runtime)"
		return 0
	fi
	log "== node runtimes: $vold ($NODE_OLD) against $vnew ($NODE_NEW)"
	put node-old version "$vold"
	put node-new version "$vnew"
	declare -gA NODE_DD=()
	local rounds=${BENCH_NODE_ROUNDS:-$BREPS}
	for ((r = 1; r <= rounds; r++)); do
		if ((r % 2)); then node_round old; node_round new; else node_round new; node_round old; fi
	done
	local label
	for label in old new; do
		# shellcheck disable=SC2086 # a list of numbers
		[[ -n ${NODE_DD[$label]:-} ]] && put "node-$label" dd_mbps "$(median ${NODE_DD[$label]})" && put "node-$label" dd_mbps_runs "${NODE_DD[$label]}"
	done
	return 0
}
