# shellcheck shell=bash
# The mount workloads of scripts/bench (sourced by it; uses its GV, REPODIR, GEN1, GEN1_SIZE,
# CORPUS, WORK, SHM, LOGDIR, TIMEOUT, TOOLS, SCALE, MAIN_OK, RESTIC_SNAP, BG_PID, put, sample,
# log, drop_caches, wait_for_file, dd_mbps, fuse_ref_mbps and LAST_SECS). For genvault,
# restic and borg alike, in BENCH_MOUNT_ROUNDS rounds; in each round every workload visits
# the tools in turn (genvault, restic, borg), each on a FRESH mount (the FUSE server's own
# caches empty) with the kernel cache dropped right before the measured read:
#   - dd bs=4M of the gen1 image through the mount: MB/s;
#   - file-level restore: the mounted image file on a read-only loop device (partitions
#     scanned), the corpus partition mounted ro,noload, `tar cf - TREES | cat >/dev/null`
#     (GNU tar does not read file data when its output is /dev/null itself): seconds;
#   - fio random 4 KiB reads of the image, queue depth 1 (psync) and 16: IOPS.
# With each: the FUSE server's CPU seconds for that workload (utime+stime of the server
# process, all its threads, from /proc/PID/stat before and after) and its peak RSS
# (VmHWM) after it. Medians are recorded as m_* keys, all samples as m_*_runs.
#
# Two floors are measured in the same rounds, so that a bar can be set against what this
# machine can do at all (recorded under the pseudo-tools "fuse-ref" and "raw"):
#   - dd through the zero-cost fuse-native file of scripts/fuse-ref (a 4 GiB file served
#     from one buffer in memory: FUSE alone, no repository): MB/s;
#   - the file-level restore from the gen1 image itself, copied to tmpfs and put on the
#     loop device (no FUSE, no repository, no decode; ext4 and the loop device only): s.
#
# Queue depth 16: 16 fio threads each doing blocking pread() (--ioengine=psync --numjobs=16
# --thread --group_reporting). These are buffered reads (O_DIRECT is not possible on these
# mounts). fio's fadvise(POSIX_FADV_RANDOM) turns readahead off, but a missed page is still
# read through the FUSE readahead path as an asynchronous ("background") request of one
# page; the kernel hands the server at most max_background of those at once (12, the kernel
# default, for all three servers here, read from fusectl) and parks the rest in
# fuse_get_req. Checked on a genvault mount (small scale): with 16 psync threads the
# connection's "waiting" count was mostly 14-16 (at most 12 at the server, the rest queued
# in the kernel; the threads asleep in folio_wait_bit_common or fuse_get_req); with
# io_uring --iodepth=16 it swung between 1 and 13, and no io-wq worker threads appeared
# (buffered io_uring reads wait for the page asynchronously, not in a worker). So 16
# threads is what keeps 16 reads outstanding; the server sees min(16, max_background).

MOUNT_ROUNDS=${BENCH_MOUNT_ROUNDS:-3}
if [[ $SCALE == small ]]; then MOUNT_FIO_SECS=${BENCH_MOUNT_FIO_SECS:-5}; else MOUNT_FIO_SECS=${BENCH_MOUNT_FIO_SECS:-15}; fi
CLK_TCK=$(getconf CLK_TCK)
MS_MNT="" MS_FILE="" MS_PID="" MS_ERR="" # the current fresh mount
MS_LOOP=""                                # loop device of the mounted image file
MS_PART_DEV=""                            # a partition node we made with mknod
MS_TREES=()                               # the directory trees tarred
MS_PARTNO=1                               # the corpus partition of gen1
MS_RAW=""                                 # the gen1 image copied to tmpfs (the restore's floor)

# For scripts/bench's cleanup trap: unmount the loop-mounted partition and detach every
# loop device backed by a file under WORK (the FUSE mounts themselves are WORK/mnt-*,
# which the trap unmounts after this).
mount_step_cleanup() {
	local part=$WORK/part dev back
	if [[ -d $part ]] && mountpoint -q "$part"; then
		umount "$part" 2>/dev/null || umount -l "$part" 2>/dev/null || log "warning: could not unmount $part"
	fi
	[[ -z $MS_LOOP ]] || losetup -d "$MS_LOOP" 2>/dev/null || true
	while read -r dev back; do
		[[ $back == "$WORK"/* || $back == "$SHM"/* ]] && { losetup -d "$dev" 2>/dev/null || log "warning: could not detach $dev ($back)"; }
	done < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null)
	[[ -z $MS_PART_DEV ]] || rm -f -- "$MS_PART_DEV"
	MS_LOOP="" MS_PART_DEV=""
	return 0
}

cpu_ticks() { # PID: utime+stime of the whole process (all threads), in clock ticks
	local s
	s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	s=${s##*") "} # past "pid (comm) ", comm may hold spaces
	awk '{print $12 + $13}' <<<"$s"
}
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null; }

# The FUSE server of MNT: the process with MNT on its command line holding /dev/fuse.
fuse_server_pid() {
	local p
	for p in $(pgrep -f -- "$1"); do
		[[ $p == "$$" ]] && continue
		if find "/proc/$p/fd" -maxdepth 1 -lname /dev/fuse 2>/dev/null | grep -q .; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# ms_mount TOOL: a fresh mount of the tool's main repository; sets MS_MNT, MS_FILE (gen1
# image), MS_PID (server); on failure MS_ERR and returns 1.
ms_mount() {
	local tool=$1 out lg=$LOGDIR/$1-mount-rounds.log
	MS_MNT=$WORK/mnt-m-$tool MS_FILE="" MS_PID="" MS_ERR=""
	mkdir -p "$MS_MNT"
	case $tool in
	genvault)
		# daemonizes; prints "mounted ... (pid N)"
		if out=$(timeout 120 "${GV[@]}" -r "$REPODIR/genvault" mount "$MS_MNT" 2>&1) &&
			wait_for_file "$MS_MNT/vm1/latest" 30; then
			MS_FILE=$MS_MNT/vm1/latest
			MS_PID=$(grep -oE '\(pid [0-9]+\)' <<<"$out" | grep -oE '[0-9]+' | tail -n 1 || true)
		fi
		printf '%s\n' "$out" >>"$lg"
		;;
	restic)
		# stays in the foreground: the background job is the server itself
		restic -r "$REPODIR/restic" mount "$MS_MNT" >>"$lg" 2>&1 &
		BG_PID=$!
		MS_PID=$BG_PID
		out=$MS_MNT/tags/vm1/latest/vm1.img
		[[ -n $RESTIC_SNAP ]] && out=$MS_MNT/ids/$RESTIC_SNAP/vm1.img
		wait_for_file "$out" 120 && MS_FILE=$out
		;;
	borg)
		# daemonizes once the mount is ready
		borg mount "$REPODIR/borg::vm1-gen1" "$MS_MNT" >>"$lg" 2>&1 &&
			wait_for_file "$MS_MNT/vm1.img" 30 && MS_FILE=$MS_MNT/vm1.img
		;;
	esac
	if [[ -z $MS_FILE ]]; then
		MS_ERR="mount failed: $(tail -n 1 "$lg" 2>/dev/null)"
		MS_PID=""
		return 1
	fi
	if [[ -z $MS_PID || ! -d /proc/$MS_PID ]] || ! find "/proc/$MS_PID/fd" -maxdepth 1 -lname /dev/fuse 2>/dev/null | grep -q .; then
		MS_PID=$(fuse_server_pid "$MS_MNT" || true)
	fi
	[[ -n $MS_PID ]] || log "  $tool: FUSE server process of $MS_MNT not found: no CPU/RSS figures"
	return 0
}

ms_umount() { # TOOL
	local tool=$1 lg=$LOGDIR/$1-mount-rounds.log i pid=$MS_PID
	mount_step_cleanup
	if mountpoint -q "$MS_MNT"; then
		case $tool in
		genvault) "${GV[@]}" umount "$MS_MNT" >>"$lg" 2>&1 ;;
		borg) borg umount "$MS_MNT" >>"$lg" 2>&1 ;;
		restic) fusermount -u "$MS_MNT" >>"$lg" 2>&1 ;;
		esac || fusermount -uz "$MS_MNT" 2>/dev/null || umount -l "$MS_MNT" 2>/dev/null ||
			log "warning: could not unmount $MS_MNT"
	fi
	if [[ $tool == restic && -n $BG_PID ]]; then
		pid=$BG_PID
	fi
	# the server must be gone before the next measurement starts
	for ((i = 0; i < 100; i++)); do
		[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
		log "warning: $tool FUSE server $pid still running 10 s after unmount; killing it"
		kill "$pid" 2>/dev/null || true
	fi
	if [[ $tool == restic && -n $BG_PID ]]; then
		wait "$BG_PID" 2>/dev/null || true
		BG_PID=""
	fi
	MS_PID=""
}

# ms_server_begin / ms_server_end TOOL METRIC: CPU seconds of the server between the two
# and its VmHWM after, as samples METRIC_cpu_s and METRIC_rss_kib.
MS_C0=""
ms_server_begin() { MS_C0=""; [[ -n $MS_PID ]] && MS_C0=$(cpu_ticks "$MS_PID" || true); return 0; }
ms_server_end() {
	local tool=$1 metric=$2 c1 hwm
	[[ -n $MS_C0 && -n $MS_PID ]] || return 0
	c1=$(cpu_ticks "$MS_PID") || return 0
	hwm=$(hwm_kib "$MS_PID")
	LAST_SECS=$(python3 -c "print(round(($c1 - $MS_C0) / $CLK_TCK, 2))")
	sample "$tool" "${metric}_cpu_s"
	MS_LAST_CPU=$LAST_SECS
	if [[ -n $hwm ]]; then
		LAST_SECS=$hwm
		sample "$tool" "${metric}_rss_kib"
	fi
}

# The kernel's read-ahead for the current mount's files (KiB), as its server left it.
ms_readahead_kb() {
	local dev
	dev=$(mountpoint -d "$MS_MNT" 2>/dev/null) && cat "/sys/class/bdi/$dev/read_ahead_kb" 2>/dev/null || echo "?"
}

ms_dd() { # TOOL
	local tool=$1 out
	drop_caches
	ms_server_begin
	if ! out=$(timeout "$TIMEOUT" dd if="$MS_FILE" of=/dev/null bs=4M 2>&1); then
		MS_ERR="dd: $(tail -n 1 <<<"$out")"
		return 1
	fi
	MS_LAST_CPU="n/a"
	ms_server_end "$tool" m_dd
	if ! dd_mbps "$out"; then
		MS_ERR="dd: $DD_ERR"
		return 1
	fi
	LAST_SECS=$DD_MBPS
	sample "$tool" m_dd_mbps
	log "  $tool dd via fresh mount: $LAST_SECS MB/s, server CPU $MS_LAST_CPU s, kernel read-ahead $(ms_readahead_kb) KiB"
}

# The partition node of loop device $1, partition MS_PARTNO (partx -a if the kernel's
# partition scan made none; mknod from sysfs if no node appears in /dev).
ms_loop_part() {
	local loop=$1 p i sys
	p=${loop}p$MS_PARTNO
	sys=/sys/block/${loop#/dev/}/${loop#/dev/}p$MS_PARTNO
	for ((i = 0; i < 10; i++)); do
		[[ -b $p ]] && { echo "$p"; return 0; }
		sleep 0.1
	done
	partx -a "$loop" >/dev/null 2>&1 || true
	for ((i = 0; i < 20; i++)); do
		[[ -b $p ]] && { echo "$p"; return 0; }
		sleep 0.1
	done
	if [[ -r $sys/dev ]]; then
		MS_PART_DEV=$WORK/part-dev
		rm -f -- "$MS_PART_DEV"
		mknod "$MS_PART_DEV" b "$(cut -d: -f1 "$sys/dev")" "$(cut -d: -f2 "$sys/dev")" &&
			{ echo "$MS_PART_DEV"; return 0; }
	fi
	return 1
}

ms_tar() { # TOOL
	local tool=$1 part=$WORK/part dev t0 t1 rc=0 lg=$LOGDIR/$1-mount-tar.log
	mkdir -p "$part"
	if ! MS_LOOP=$(losetup -r -P --show -f "$MS_FILE" 2>"$lg"); then
		MS_LOOP=""
		MS_ERR="losetup: $(tail -n 1 "$lg")"
		return 1
	fi
	if ! dev=$(ms_loop_part "$MS_LOOP"); then
		MS_ERR="no partition $MS_PARTNO on $MS_LOOP"
		return 1
	fi
	if ! mount -t ext4 -o ro,noload "$dev" "$part" 2>>"$lg"; then
		MS_ERR="mount of $dev: $(tail -n 1 "$lg")"
		return 1
	fi
	drop_caches
	ms_server_begin
	t0=$(date +%s.%N)
	timeout "$TIMEOUT" tar -C "$part" --totals -cf - "${MS_TREES[@]}" 2>>"$lg" | cat >/dev/null || rc=$?
	t1=$(date +%s.%N)
	if ((rc != 0)); then
		MS_ERR="tar exit $rc: $(tail -n 1 "$lg")"
		return 1
	fi
	MS_LAST_CPU="n/a"
	ms_server_end "$tool" m_tar
	LAST_SECS=$(python3 -c "print(round($t1 - $t0, 2))")
	sample "$tool" m_tar_s
	# what was tarred, measured on this copy (metadata now cached, after the timing)
	if [[ -z ${MS_TARRED[$tool]:-} ]]; then
		local files bytes archive
		files=$(cd "$part" && find "${MS_TREES[@]}" -type f | wc -l)
		bytes=$(cd "$part" && find "${MS_TREES[@]}" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
		archive=$(grep -oE 'Total bytes written: [0-9]+' "$lg" | tail -n 1 | grep -oE '[0-9]+$' || true)
		put "$tool" m_tar_files "$files"
		put "$tool" m_tar_bytes "$bytes"
		[[ -n $archive ]] && put "$tool" m_tar_archive_bytes "$archive"
		MS_TARRED[$tool]=1
	fi
	log "  $tool file-level restore (tar of ${MS_TREES[*]}): $LAST_SECS s, server CPU $MS_LAST_CPU s"
	umount "$part" 2>>"$lg" || umount -l "$part"
	losetup -d "$MS_LOOP"
	MS_LOOP=""
}

ms_fio() { # TOOL qd1|qd16
	local tool=$1 qd=$2 lg=$LOGDIR/$1-mount-fio-$2.log
	local -a extra=()
	[[ $qd == qd16 ]] && extra=(--numjobs=16 --thread --group_reporting)
	drop_caches
	ms_server_begin
	if ! timeout "$((MOUNT_FIO_SECS + 120))" fio --name="rand4k-$qd" --filename="$MS_FILE" --readonly \
		--rw=randread --bs=4k --ioengine=psync --runtime="$MOUNT_FIO_SECS" --time_based \
		"${extra[@]}" --output-format=json >"$lg.json" 2>"$lg"; then
		MS_ERR="fio $qd failed: $(tail -n 1 "$lg")"
		return 1
	fi
	MS_LAST_CPU="n/a"
	ms_server_end "$tool" "m_$qd"
	if ! LAST_SECS=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$lg.json"); then
		MS_ERR="fio $qd: no IOPS in its output"
		return 1
	fi
	sample "$tool" "m_${qd}_iops"
	log "  $tool fio random 4 KiB $qd: $LAST_SECS IOPS, server CPU $MS_LAST_CPU s"
}

# The floors (see the top): the zero-cost FUSE file's dd, and the restore from the raw
# image in tmpfs on the loop device.
ms_floor() { # dd|tar
	local lg=$LOGDIR/fuse-ref-rounds.log
	MS_MNT="" MS_PID="" MS_ERR=""
	case $1 in
	dd)
		if LAST_SECS=$(fuse_ref_mbps "node $(printf '%q' "$(dirname "$0")/fuse-ref")" "$lg"); then
			sample fuse-ref m_dd_mbps
			log "  zero-cost FUSE file dd: $LAST_SECS MB/s"
		else
			log "  zero-cost FUSE file dd failed (log $lg)"
			put fuse-ref fail_m_dd "scripts/fuse-ref failed"
		fi
		;;
	tar)
		[[ -n $MS_RAW ]] || return 0
		MS_FILE=$MS_RAW
		ms_tar raw || {
			log "  raw image file-level restore: FAILED: $MS_ERR"
			put raw fail_m_tar "$MS_ERR"
			mount_step_cleanup
		}
		;;
	esac
	return 0
}

# The trees for the file-level restore: the full-scale corpus's two many-small-file trees
# where they exist; otherwise (small scale) the directory under usr/lib, 1 or 2 levels
# down, holding the most files. Chosen from the corpus, not through a mount.
ms_pick_trees() {
	local t
	MS_TREES=()
	for t in usr/include usr/lib/google-cloud-sdk/lib/surface; do
		[[ -d $CORPUS/$t ]] && MS_TREES+=("$t")
	done
	if ((${#MS_TREES[@]} < 2)) && [[ -d $CORPUS/usr/lib ]]; then
		t=$(cd "$CORPUS" && find usr/lib -mindepth 2 -type f | awk -F/ '
			{ a[$1 "/" $2 "/" $3]++; if (NF > 4) a[$1 "/" $2 "/" $3 "/" $4]++ }
			END { for (d in a) print a[d], d }' | sort -k1,1nr -k2 | head -n 1 | cut -d' ' -f2-)
		[[ -n $t ]] && MS_TREES+=("$t")
	fi
	# the corpus partition: the first "Linux filesystem data" partition of gen1's GPT
	MS_PARTNO=$(sfdisk --dump "$GEN1" 2>/dev/null | grep -iE 'type= *0FC63DAF-8483-4772-8E79-3D69D8477DE4' |
		head -n 1 | sed -E 's/^[^:]*[^0-9]([0-9]+) *:.*/\1/')
	[[ $MS_PARTNO =~ ^[0-9]+$ ]] || MS_PARTNO=1
}

run_mount_rounds() {
	[[ ${BENCH_MOUNT:-1} == 1 ]] || return 0
	local r w tool
	local -A dead=() failed=()
	declare -g -A MS_TARRED=()
	if ! command -v fio >/dev/null; then
		log "  fio missing: no random-read cells"
		for tool in $TOOLS; do put "$tool" fail_m_fio "fio not installed"; done
	fi
	ms_pick_trees
	MS_RAW=$SHM/gen1-raw.img
	cp --sparse=always -- "$GEN1" "$MS_RAW" || { log "  no tmpfs copy of gen1: no restore floor"; rm -f -- "$MS_RAW"; MS_RAW=""; }
	log "== mount workloads, $MOUNT_ROUNDS rounds (trees ${MS_TREES[*]}, partition $MS_PARTNO, fio ${MOUNT_FIO_SECS} s)"
	for ((r = 1; r <= MOUNT_ROUNDS; r++)); do
		log "== mount round $r of $MOUNT_ROUNDS"
		for w in dd tar qd1 qd16; do
			[[ $w == qd* ]] && ! command -v fio >/dev/null && continue
			[[ $w == tar && ${#MS_TREES[@]} -eq 0 ]] && continue
			for tool in $TOOLS; do
				[[ -n ${MAIN_OK[$tool]:-} && -z ${dead[$tool]:-} && -z ${failed["$tool $w"]:-} ]] || continue
				if ! ms_mount "$tool"; then
					log "  $tool mount failed, its mount cells n/a: $MS_ERR"
					put "$tool" fail_m_mount "$MS_ERR"
					dead[$tool]=1
					ms_umount "$tool"
					continue
				fi
				case $w in
				dd) ms_dd "$tool" ;;
				tar) ms_tar "$tool" ;;
				qd*) ms_fio "$tool" "$w" ;;
				esac || {
					log "  $tool $w via mount: FAILED: $MS_ERR"
					put "$tool" "fail_m_$w" "$MS_ERR"
					failed["$tool $w"]=1
				}
				ms_umount "$tool"
			done
			case $w in dd | tar) ms_floor "$w" ;; esac
		done
	done
	[[ -z $MS_RAW ]] || rm -f -- "$MS_RAW"
	MS_RAW=""
	return 0
}
