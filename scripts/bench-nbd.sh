# shellcheck shell=bash
# The NBD steps of scripts/bench (sourced by it; uses its GV, REPODIR, GEN0, WORK, LOGDIR,
# timed, put, log, drop_caches, MAIN_OK and LAST_SECS). They carry the bars of instant
# recovery and changed-block tracking:
#   - attach: from starting `genvault nbd vm1@latest --socket S` (cache dropped) to the first
#     answered `nbdinfo --size`, 5 runs, median;
#   - nbdcopy of the export to null (cache dropped once the export answers), 3 runs, median
#     MB/s, against the same run's `dd` through the mount;
#   - next-day backup through a QEMU dirty bitmap (qemu-nbd exporting gen0 as qcow2 with a
#     persistent bitmap) against the BLAKE3-detected next-day backup of the same disk as a
#     raw file, after the same 3% of its 64 KiB blocks were rewritten in both; 3 pairs,
#     each into a fresh copy of the repository that holds the first backup.

# Waits until an NBD server answers on socket $1 (at most $2 seconds).
nbd_wait() {
	local t=0
	until nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1; do
		sleep 0.02
		t=$((t + 1))
		((t < $2 * 50)) || return 1
	done
}

nbd_attach_and_copy() {
	local repo=$REPODIR/genvault sock=$WORK/nbd.sock pid r t0 t1 secs=() mbps=() size
	size=$(stat -c %s "$GEN1")
	for r in 1 2 3 4 5; do
		rm -f "$sock"
		drop_caches
		t0=$(date +%s.%N)
		"${GV[@]}" -r "$repo" nbd vm1@latest --socket "$sock" >>"$LOGDIR/nbd.log" 2>&1 &
		pid=$!
		if ! nbd_wait "$sock" 30; then
			kill "$pid" 2>/dev/null
			wait "$pid" 2>/dev/null
			log "  genvault nbd did not answer: $(tail -n 1 "$LOGDIR/nbd.log")"
			put genvault-nbd fail_attach "did not answer"
			return 1
		fi
		t1=$(date +%s.%N)
		secs+=("$(echo "$t1 - $t0" | bc)")
		if ((r <= 3)); then
			drop_caches
			t0=$(date +%s.%N)
			nbdcopy "nbd+unix:///?socket=$sock" null: 2>>"$LOGDIR/nbd.log"
			t1=$(date +%s.%N)
			mbps+=("$(echo "scale=1; $size / ($t1 - $t0) / 1000000" | bc)")
		fi
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	put genvault-nbd attach_s "$(printf '%s\n' "${secs[@]}" | sort -n | sed -n 3p)"
	put genvault-nbd nbdcopy_mbps "$(printf '%s\n' "${mbps[@]}" | sort -n | sed -n 2p)"
	log "  genvault nbd attach: ${secs[*]} s; nbdcopy: ${mbps[*]} MB/s"
}

# qemu-io commands rewriting 3% of the 64 KiB blocks of a disk of $1 bytes (seed 7).
nbd_changes() {
	python3 - "$1" <<-'PY'
		import random, sys
		blocks = int(sys.argv[1]) // 65536
		rnd = random.Random(7)
		for b in sorted(rnd.sample(range(blocks), blocks * 3 // 100)):
		    print(f"-c\nwrite -P 0x{rnd.randrange(1, 255):02x} {b * 65536} 64k")
	PY
}

nbd_bitmap() {
	local qcow=$WORK/gen0.qcow2 raw=$WORK/gen0.raw rb=$WORK/repo-bitmap rr=$WORK/repo-raw sock=$WORK/qemu.sock q r
	rm -rf -- "$qcow" "$raw" "$rb" "$rr"
	qemu-img convert -f raw -O qcow2 "$GEN0" "$qcow" && qemu-img bitmap --add "$qcow" b0 && cp --sparse=always "$GEN0" "$raw" || {
		put genvault-nbd fail_bitmap "could not prepare the images"
		return 1
	}
	init_repo genvault "$rb" && init_repo genvault "$rr" || return 1
	qemu-nbd -r -t -f qcow2 -B b0 -k "$sock" "$qcow" 2>>"$LOGDIR/nbd.log" &
	q=$!
	nbd_wait "$sock" 30 && "${GV[@]}" -r "$rb" backup "nbd+unix:///?socket=$sock" --bitmap b0 --name vmq >>"$LOGDIR/nbd.log" 2>&1
	kill "$q"
	wait "$q" 2>/dev/null
	"${GV[@]}" -r "$rr" backup "$raw" --name vmr >>"$LOGDIR/nbd.log" 2>&1 || return 1
	local cmds=()
	mapfile -t cmds < <(nbd_changes "$(stat -c %s "$GEN0")")
	qemu-io -f qcow2 "$qcow" "${cmds[@]}" >/dev/null && qemu-io -f raw "$raw" "${cmds[@]}" >/dev/null || return 1
	for r in 1 2 3; do
		rm -rf -- "$rb.run" "$rr.run"
		cp -a "$rb" "$rb.run" && cp -a "$rr" "$rr.run"
		qemu-nbd -r -t -f qcow2 -B b0 -k "$sock" "$qcow" 2>>"$LOGDIR/nbd.log" &
		q=$!
		nbd_wait "$sock" 30 && cat -- "$qcow" "$raw" >/dev/null
		timed genvault-nbd "bitmap_$r" -- "${GV[@]}" -r "$rb.run" backup "nbd+unix:///?socket=$sock" --bitmap b0 --name vmq
		kill "$q"
		wait "$q" 2>/dev/null
		timed genvault-nbd "rawnext_$r" -- "${GV[@]}" -r "$rr.run" backup "$raw" --name vmr
	done
	rm -rf -- "$qcow" "$raw" "$rb" "$rr" "$rb.run" "$rr.run"
}

run_nbd() {
	[[ ${BENCH_NBD:-1} == 1 && -n ${MAIN_OK[genvault]:-} ]] || return 0
	if ! command -v nbdinfo >/dev/null || ! command -v qemu-nbd >/dev/null; then
		log "  nbd steps skipped: libnbd-bin or qemu-utils missing"
		return 0
	fi
	log "== genvault over NBD"
	nbd_attach_and_copy || true
	nbd_bitmap || log "  dirty-bitmap step failed: $(tail -n 1 "$LOGDIR/nbd.log")"
}
