# shellcheck shell=bash
# Two variants of genvault against each other, steps of scripts/bench (sourced by it; uses
# its GV, GEN0, GEN1, REPODIR, SHM, WORK, LOGDIR, RESULTS, GV_ENCRYPTION, timed, sample,
# put, put_stored, log, warm_input, drop_caches, verify_restore, dd_read, wait_for_file and
# median). Each variant runs in alternating rounds (A B, B A, ...) so that a slow minute
# lands on both; per round and variant: a fresh repository, first and next-day backup
# (stored bytes after each), a cold restore of gen1 (checked), a cold `list` (start-up) and
# a cold dd of gen1 through a mount (with the mount server's peak RSS). Medians are
# reported, with the ratio B/A.
#   - runtimes (BENCH_NODE=1, default): the checkout's build on an older Node.js
#     (BENCH_NODE_OLD, default /usr/bin/node, when its major version differs) against the
#     pinned runtime (scripts/runtime); tools node-old and node-new.
#   - encryption (BENCH_CRYPT=1, default): `init --encryption none` against the default
#     (encrypted, key from a file), both with the bench's genvault command; tools crypt-none
#     and crypt-aes.
# BENCH_VARIANT_ROUNDS sets the rounds of each (default BENCH_BACKUP_REPS).

# variant_round TOOL: one round of the variant whose command is VGV and whose init
# arguments are VINIT.
variant_round() {
	local tool=$1 repo=$REPODIR/$1 mnt=$WORK/mnt-$1 file=$SHM/variant.img pid
	rm -rf -- "$repo"
	"${VGV[@]}" -r "$repo" init "${VINIT[@]}" >"$LOGDIR/$tool-init.log" 2>&1 || {
		log "  $tool init failed: $(tail -n 1 "$LOGDIR/$tool-init.log")"
		return 1
	}
	warm_input "$GEN0"
	timed "$tool" b_gen0 -- "${VGV[@]}" -r "$repo" backup "$GEN0" --name vm1 && sample "$tool" b_gen0
	put_stored "$tool" gen0 "$repo"
	warm_input "$GEN1"
	timed "$tool" b_gen1 -- "${VGV[@]}" -r "$repo" backup "$GEN1" --name vm1 && sample "$tool" b_gen1
	put_stored "$tool" gen1 "$repo"
	drop_caches
	timed "$tool" r_gen1 -- "${VGV[@]}" -r "$repo" restore vm1@latest "$file" && sample "$tool" r_gen1
	verify_restore "$tool" "$file" || put "$tool" restore_bad 1
	drop_caches
	timed "$tool" list -- "${VGV[@]}" -r "$repo" list && sample "$tool" list
	mkdir -p "$mnt"
	if timeout 120 "${VGV[@]}" -r "$repo" mount "$mnt" >"$LOGDIR/$tool-mount.log" 2>&1 && wait_for_file "$mnt/vm1/latest" 30; then
		if dd_read "$tool" "$mnt/vm1/latest"; then
			VARIANT_DD[$tool]+="${VARIANT_DD[$tool]:+ }$(awk -v t="$tool" '$1 == t && $2 == "dd_mbps" {v = $3} END {print v}' "$RESULTS")"
		fi
		pid=$(pgrep -f -- "mount $mnt" | head -n 1 || true)
		[[ -n $pid && -r /proc/$pid/status ]] && put "$tool" mount_rss_kib "$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")"
	else
		log "  $tool mount failed: $(tail -n 1 "$LOGDIR/$tool-mount.log" 2>/dev/null)"
	fi
	mountpoint -q "$mnt" && { "${VGV[@]}" umount "$mnt" >>"$LOGDIR/$tool-mount.log" 2>&1 || fusermount -uz "$mnt"; }
	log "  $tool: gen0 ${SAMPLES["$tool b_gen0"]##* } s, gen1 ${SAMPLES["$tool b_gen1"]##* } s, restore ${SAMPLES["$tool r_gen1"]##* } s, list ${SAMPLES["$tool list"]##* } s"
	rm -rf -- "$repo"
}

declare -A VARIANT_DD=()
# variant_rounds A B: alternating rounds; the caller's variant_set LABEL sets VGV and VINIT.
variant_rounds() {
	local a=$1 b=$2 r t
	local rounds=${BENCH_VARIANT_ROUNDS:-$BREPS}
	for ((r = 1; r <= rounds; r++)); do
		for t in $(if ((r % 2)); then echo "$a $b"; else echo "$b $a"; fi); do
			variant_set "$t"
			variant_round "$t"
		done
	done
	for t in "$a" "$b"; do
		# shellcheck disable=SC2086 # a list of numbers
		[[ -n ${VARIANT_DD[$t]:-} ]] && put "$t" dd_mbps "$(median ${VARIANT_DD[$t]})" && put "$t" dd_mbps_runs "${VARIANT_DD[$t]}"
	done
	return 0
}

# The checkout's build on each runtime, as an installed wrapper runs it: each with the
# young-generation cap measured best for it (Node.js 20: 4 MiB, 24: 1 MiB; native-notes/
# performance.md).
node_variant() {
	VINIT=(--encryption "$GV_ENCRYPTION")
	if [[ $1 == node-old ]]; then
		VGV=("$NODE_OLD" "--max-semi-space-size=${BENCH_NODE_OLD_SEMI:-4}" "$NODE_MAIN")
	else
		VGV=("$NODE_NEW" --max-semi-space-size=1 "$NODE_MAIN")
	fi
}

run_node() {
	[[ ${BENCH_NODE:-1} == 1 ]] || return 0
	NODE_MAIN=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/dist/cli/main.js
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
	variant_set() { node_variant "$@"; }
	variant_rounds node-old node-new
}

crypt_variant() {
	VGV=("${GV[@]}")
	if [[ $1 == crypt-none ]]; then VINIT=(--encryption none); else VINIT=(--encryption aes-256-gcm); fi
}

run_crypt() {
	[[ ${BENCH_CRYPT:-1} == 1 && -n ${MAIN_OK[genvault]:-} ]] || return 0
	log "== encryption: unencrypted against encrypted (the default), same genvault"
	put crypt-none version "--encryption none"
	put crypt-aes version "encrypted (default)"
	variant_set() { crypt_variant "$@"; }
	variant_rounds crypt-none crypt-aes
}
