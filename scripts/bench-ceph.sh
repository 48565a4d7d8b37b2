# shellcheck shell=bash
# The Ceph steps of scripts/bench (sourced by it; uses its GV, GV_ENCRYPTION, GEN0, WORK,
# LOGDIR, timed, put, log, drop_caches, warm_input, init_repo, median, MAIN_OK, LAST_SECS
# and BREPS). A single-node cluster (scripts/ceph-cluster: memstore OSD, radosgw) runs on
# this machine for them. They carry the bars of the Ceph issue:
#   - first backup of gen0 into an s3:// repository on radosgw against the same into a
#     local repository: BREPS alternating pairs, each into a fresh repository, each round
#     on a fresh cluster (ceph_round_cluster says why); medians;
#     throughput ratio = local time / s3 time;
#   - dd of gen0 through a mount of the s3:// repository against a mount of the local one,
#     cold (caches dropped; a fresh mount each time): 3 alternating pairs, median MB/s;
#   - RBD: gen0 imported as an image, snapshot, full backup; then the next day's changes
#     (the 64 KiB blocks in which gen1 differs from gen0, written with `rbd import-diff`,
#     which also makes the second snapshot), and the next-day backup through `rbd
#     export-diff`: the bytes it read from rbd against the bytes changed, and its time.

ceph_bench_up() {
	CEPH_DIR=$WORK/ceph
	rm -rf -- "$CEPH_DIR"
	local out
	# memstore keeps every object in the OSD's memory: the RBD image and the s3 repositories.
	out=$("$(dirname "$0")/ceph-cluster" start "$CEPH_DIR" 16789 17480 --mem $((14 << 30)) 2>>"$LOGDIR/ceph.log") || return 1
	CEPH_CONF=$CEPH_DIR/ceph.conf
	export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL
	AWS_ENDPOINT_URL=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["endpoint"])' "$out")
	AWS_ACCESS_KEY_ID=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["accessKey"])' "$out")
	AWS_SECRET_ACCESS_KEY=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["secretKey"])' "$out")
	export GENVAULT_CACHE_DIR=$WORK/s3-cache
}

ceph_bench_down() {
	if [[ -n ${CEPH_DIR:-} ]]; then
		"$(dirname "$0")/ceph-cluster" stop "$CEPH_DIR" 2>>"$LOGDIR/ceph.log" || true
		rm -rf -- "$CEPH_DIR" "$WORK/s3-cache"
	fi
	CEPH_DIR=
	unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL GENVAULT_CACHE_DIR
}

# A fresh cluster for a round of the backup pairs, warmed by one small multipart backup:
# a cluster's first CreateMultipartUpload creates radosgw's pool for multipart metadata
# (1.3-1.7 s, once in a cluster's life). A fresh one per round because the memstore OSD
# keeps removed buckets' multipart data in its memory until radosgw's garbage collection
# (2 hours later): later rounds ran 1-3 s slower on a fuller OSD, and forcing that
# collection broke memstore's accounting (native-notes/performance.md, Ceph, 2026-12-07).
ceph_round_cluster() {
	ceph_bench_down
	ceph_bench_up || return 1
	head -c $((20 << 20)) /dev/urandom >"$WORK/ceph-warm.img"
	{ "${GV[@]}" -r s3://warm/gv init --encryption none && "${GV[@]}" -r s3://warm/gv backup "$WORK/ceph-warm.img" --name warm; } >>"$LOGDIR/ceph.log" 2>&1
	rm -f -- "$WORK/ceph-warm.img"
}

ceph_backups() {
	local r lrepo=$WORK/s3-local-repo s3repo
	for ((r = 1; r <= BREPS; r++)); do
		((r == 1)) || ceph_round_cluster || return 1
		rm -rf -- "$lrepo"
		if init_repo genvault "$lrepo"; then
			warm_input "$GEN0"
			timed genvault-ceph "b_local_$r" -- "${GV[@]}" -r "$lrepo" backup "$GEN0" --name vm1 &&
				{ sample genvault-ceph b_local; log "  local gen0: $LAST_SECS s"; }
		fi
		rm -rf -- "$lrepo"
		s3repo=s3://bench-$r/gv
		if init_repo genvault "$s3repo"; then
			warm_input "$GEN0"
			timed genvault-ceph "b_s3_$r" -- "${GV[@]}" -r "$s3repo" backup "$GEN0" --name vm1 &&
				{ sample genvault-ceph b_s3; log "  s3 gen0: $LAST_SECS s"; }
		else
			log "  s3 init failed: $(tail -n 1 "$LOGDIR/genvault-init.log")"
		fi
	done
	CEPH_S3_REPO=s3://bench-$BREPS/gv
}

# dd of vm1 through a fresh mount of repository $2 (label $1): one MB/s sample.
ceph_dd() {
	local label=$1 repo=$2 mnt=$WORK/mnt-ceph out bytes secs
	mkdir -p "$mnt"
	"${GV[@]}" -r "$repo" mount "$mnt" >>"$LOGDIR/ceph-mount.log" 2>&1 || return 1
	drop_caches
	out=$(dd if="$mnt/vm1/latest" of=/dev/null bs=4M 2>&1 | tail -n 1)
	"${GV[@]}" umount "$mnt" >>"$LOGDIR/ceph-mount.log" 2>&1
	bytes=${out%% *}
	secs=$(sed -E 's/.* copied, ([0-9.e+-]+) s,.*/\1/' <<<"$out")
	[[ $bytes == "$(stat -c %s "$GEN0")" ]] || return 1
	LAST_SECS=$(python3 -c "print(round($bytes / 1e6 / max($secs, 1e-9), 1))")
	sample genvault-ceph "dd_$label"
	log "  dd through the $label mount: $LAST_SECS MB/s"
}

ceph_mounts() {
	local lrepo=$WORK/s3-local-repo r
	rm -rf -- "$lrepo"
	init_repo genvault "$lrepo" && "${GV[@]}" -r "$lrepo" backup "$GEN0" --name vm1 >>"$LOGDIR/ceph.log" 2>&1 || return 1
	for r in 1 2 3; do
		ceph_dd local "$lrepo" || log "  dd through the local mount failed"
		ceph_dd s3 "$CEPH_S3_REPO" || log "  dd through the s3 mount failed"
	done
	rm -rf -- "$lrepo"
}

# An `rbd diff v1` stream to snapshot $3 of the 64 KiB blocks in which $2 differs from $1;
# prints the bytes it changes.
rbd_day_diff() {
	python3 - "$1" "$2" "$3" "$4" <<-'PY'
		import struct, sys
		a, b, snap, out = sys.argv[1:5]
		B = 65536
		size = __import__("os").path.getsize(b)
		changed = 0
		with open(a, "rb") as fa, open(b, "rb") as fb, open(out, "wb") as o:
		    o.write(b"rbd diff v1\n" + b"t" + struct.pack("<I", len(snap)) + snap.encode() + b"s" + struct.pack("<Q", size))
		    off = 0
		    while off < size:
		        x, y = fa.read(B), fb.read(B)
		        if x != y:
		            o.write(b"w" + struct.pack("<QQ", off, len(y)) + y)
		            changed += len(y)
		        off += len(y)
		    o.write(b"e")
		print(changed)
	PY
}

ceph_rbd() {
	local C=(-c "$CEPH_CONF") repo=$WORK/rbd-repo total json
	ceph "${C[@]}" osd pool create rbd 8 >>"$LOGDIR/ceph.log" 2>&1 && rbd "${C[@]}" pool init rbd &&
		rbd "${C[@]}" import --no-progress "$GEN0" rbd/vm >>"$LOGDIR/ceph.log" 2>&1 &&
		rbd "${C[@]}" snap create rbd/vm@s1 >>"$LOGDIR/ceph.log" 2>&1 || return 1
	rm -rf -- "$repo"
	init_repo genvault "$repo" || return 1
	timed genvault-ceph rbd_full --out "$WORK/rbd-full.json" -- "${GV[@]}" -r "$repo" backup rbd:rbd/vm@s1 --name vm --ceph-conf "$CEPH_CONF" --json || return 1
	total=$(rbd_day_diff "$GEN0" "$GEN1" s2 "$WORK/day.rbddiff") &&
		rbd "${C[@]}" import-diff --no-progress "$WORK/day.rbddiff" rbd/vm >>"$LOGDIR/ceph.log" 2>&1 || return 1
	rm -f -- "$WORK/day.rbddiff"
	timed genvault-ceph rbd_next --out "$WORK/rbd-next.json" -- "${GV[@]}" -r "$repo" backup rbd:rbd/vm@s2 --name vm --ceph-conf "$CEPH_CONF" --json || return 1
	json=$(cat "$WORK/rbd-next.json")
	put genvault-ceph rbd_written "$total"
	put genvault-ceph rbd_read "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["rbd"]["readBytes"])' "$json")"
	log "  rbd next-day: wrote $total bytes, read $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["rbd"]["readBytes"])' "$json")"
	rm -rf -- "$repo"
}

run_ceph() {
	[[ ${BENCH_CEPH:-1} == 1 && -n ${MAIN_OK[genvault]:-} ]] || return 0
	if ! command -v ceph-osd >/dev/null || ! command -v radosgw >/dev/null; then
		log "  ceph steps skipped: Debian's ceph packages missing (scripts/setup)"
		return 0
	fi
	log "== genvault on Ceph (radosgw, RBD)"
	if ! ceph_round_cluster; then
		log "  the ceph cluster did not start: $(tail -n 2 "$LOGDIR/ceph.log" | tr '\n' ' ')"
		put genvault-ceph fail "cluster did not start"
		return 0
	fi
	ceph_backups || true
	ceph_mounts || log "  mount steps failed: $(tail -n 1 "$LOGDIR/ceph-mount.log")"
	ceph_rbd || log "  rbd step failed: $(tail -n 1 "$LOGDIR/ceph.log")"
	ceph_bench_down
}
