# SPDX-License-Identifier: GPL-2.0
#
# Shared helpers for the harness commands: the Debian trixie build root, the
# pinned Linux 7.3 source, and the assembled kernel tree. Sourced, not run.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${JQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rust-jobqueue}
MIRROR=${JQ_MIRROR:-http://deb.debian.org/debian}

# The kernel series we build on: Debian's linux-source-7.3 from trixie-backports.
KSERIES=7.3
KPKG=linux-source-$KSERIES

# Everything the build root needs. Changing this list remakes the root.
# trace-cmd and perf (linux-perf) record the trace events in the test guest
# (copied into its initramfs) and read them back on the host.
ROOT_PKGS="build-essential bc bison flex libelf-dev libssl-dev python3 rustc
rust-src bindgen clang lld llvm libclang-dev kmod cpio xz-utils rsync git
rustfmt rust-clippy perl python3-ply python3-git qemu-system-x86 busybox-static
ca-certificates trace-cmd linux-perf"

log() { printf '[harness] %s\n' "$*" >&2; }
die() { printf '[harness] error: %s\n' "$*" >&2; exit 1; }

# The host requirements of README.md, each with a one-line error.
[ "$(id -u)" = 0 ] ||
	die "run as root: the build root is made with mmdebstrap and entered with unshare and chroot"
command -v apt-get > /dev/null ||
	die "a Debian or Ubuntu host is needed: apt-get installs mmdebstrap"
mkdir -p "$CACHE"
# A first run needs room for two build roots, the kernel tree and the build
# directories; later runs only grow the builds.
need_gib=4
compgen -G "$CACHE/root-min-*" > /dev/null || need_gib=25
free_kib=$(df -Pk "$CACHE" | awk 'NR == 2 { print $4 }')
[ "$free_kib" -ge $((need_gib * 1024 * 1024)) ] ||
	die "$CACHE needs $need_gib GiB free, has $((free_kib / 1024 / 1024)) GiB (or set JQ_CACHE)"

# root_dir NAME EXTRA: path of the root made for NAME with EXTRA apt arguments.
root_dir() {
	local key
	key=$(printf '%s\n%s\n%s\n' "$ROOT_PKGS" "$2" "$MIRROR" | sha256sum | cut -c1-12)
	echo "$CACHE/root-$1-$key"
}

# ensure_root NAME [EXTRA_HOOK]: make the trixie root once, reuse it afterwards.
# NAME "min" is the kernel's minimum Rust (trixie), "new" the newest Rust in
# trixie-backports.
ensure_root() {
	local name=$1 extra=${2:-} dir tmp
	dir=$(root_dir "$name" "$extra")
	if [ -e "$dir/.complete" ]; then
		touch "$dir/.used"
		echo "$dir"
		return
	fi
	command -v mmdebstrap >/dev/null || {
		log "installing mmdebstrap on the host"
		{ apt-get update -qq && apt-get install -y -qq mmdebstrap; } > "$CACHE/host-apt.log" 2>&1 ||
			die "apt-get could not install mmdebstrap on the host (see $CACHE/host-apt.log)"
	}
	log "creating build root $dir (about a minute)"
	tmp="$dir.tmp"
	rm -rf "$tmp"
	# Roots of an older package list go once unused for two days: a checkout
	# of an older revision sharing the cache still finds its root meanwhile.
	find "$CACHE" -maxdepth 1 -name "root-$name-*" ! -name "${dir##*/}" -type d \
		-exec sh -c '[ -z "$(find "$1/.used" "$1/.complete" -mmin -2880 2>/dev/null)" ]' sh {} \; \
		-exec rm -rf {} + 2>/dev/null || true
	# shellcheck disable=SC2086
	mmdebstrap --variant=apt --components=main \
		--include="$(echo $ROOT_PKGS | tr ' ' ',')" \
		${extra:+--customize-hook="$extra"} \
		trixie "$tmp" \
		"deb $MIRROR trixie main" \
		"deb $MIRROR trixie-backports main" > "$CACHE/root-$name.log" 2>&1 ||
		die "could not make the build root from $MIRROR (network? see $CACHE/root-$name.log)"
	touch "$tmp/.complete"
	mv "$tmp" "$dir"
	echo "$dir"
}

# inroot ROOT CMD...: run CMD in ROOT with /proc, /dev, /dev/shm, the cache
# (as /c) and this repository (as /repo) mounted, in a private mount namespace
# so every mount goes away with the command.
inroot() {
	local root=$1
	shift
	mkdir -p "$root/c" "$root/repo"
	install -m 755 "$REPO/harness/qemu-system-x86_64" "$root/usr/local/bin/qemu-system-x86_64"
	unshare -m --propagation private -- /bin/bash -c '
		set -e
		r=$1; c=$2; repo=$3; shift 3
		mount -t proc proc "$r/proc"
		mount --rbind /dev "$r/dev"
		mount -t tmpfs shm "$r/dev/shm"
		mount --bind "$c" "$r/c"
		mount --bind "$repo" "$r/repo"
		exec chroot "$r" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
			PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "$@"
	' inroot "$root" "$CACHE" "$REPO" "$@"
}

# ensure_base ROOT: the pristine Linux source as the single commit `base` of
# the git repository $TREE. Made once from the newest linux-source-7.3 of
# trixie-backports; remade when JQ_REFRESH_SOURCE is set and the version moved.
TREE=$CACHE/linux
ensure_base() {
	local root=$1 deb ver tmp
	if [ -e "$TREE/.git/jq-base-complete" ] && [ -z "${JQ_REFRESH_SOURCE:-}" ]; then
		return
	fi
	log "downloading $KPKG from trixie-backports"
	tmp=$CACHE/dl
	rm -rf "$tmp"
	mkdir -p "$tmp"
	inroot "$root" /bin/sh -c "apt-get update -qq && cd /c/dl && apt-get download -qq $KPKG/trixie-backports" \
		> "$CACHE/source.log" 2>&1 || die "could not download $KPKG (network? see $CACHE/source.log)"
	deb=$(ls "$tmp"/"$KPKG"_*.deb)
	ver=$(dpkg-deb -f "$deb" Version)
	if [ -e "$TREE/.git/jq-base-complete" ] && [ "$(cat "$TREE/.git/jq-base-version")" = "$ver" ]; then
		rm -rf "$tmp"
		return
	fi
	log "unpacking $KPKG $ver into $TREE"
	rm -rf "$TREE" "$CACHE"/build
	mkdir -p "$TREE"
	dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$KPKG.tar.xz" |
		tar -xJ -C "$TREE" --strip-components=1
	rm -rf "$tmp"
	log "committing the pristine tree as 'base'"
	(
		cd "$TREE"
		git init -q -b base
		git config user.name "jobqueue harness"
		git config user.email "harness@invalid"
		git config core.autocrlf false
		git config gc.auto 0
		git add -A -f
		GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z" \
			git commit -q -m "Linux $ver (Debian $KPKG)"
	)
	echo "$ver" > "$TREE/.git/jq-base-version"
	touch "$TREE/.git/jq-base-complete"
}

kernel_version() {
	make -s -C "$TREE" kernelversion
}

# assemble: turn patches/ and linux/ into one commit per series entry on top of
# `base`, then check the result out in $TREE. Only files whose content changed
# are rewritten, so incremental builds stay incremental.
assemble() {
	local idx parent entry dir f blob tree msg commit listed mail=
	idx=$(mktemp)
	listed=$(mktemp)
	trap 'rm -f "$idx" "$listed"' RETURN
	parent=$(git -C "$TREE" rev-parse base)
	export GIT_INDEX_FILE=$idx
	git -C "$TREE" read-tree "$parent"
	while read -r entry; do
		case "$entry" in ''|'#'*) continue ;; esac
		dir=$REPO/patches/$entry
		[ -f "$dir/message" ] || die "patches/$entry/message is missing"
		# The entries of patches/local come last and are not mailed.
		if grep -qx "$entry" "$REPO/patches/local"; then
			: "${mail:=$parent}"
		elif [ -n "$mail" ]; then
			die "patches/series: $entry comes after an entry of patches/local"
		fi
		for f in "$dir"/*.diff; do
			[ -e "$f" ] || continue
			git -C "$TREE" apply --cached --whitespace=nowarn "$f" ||
				die "patches/$entry/$(basename "$f") does not apply"
		done
		if [ -f "$dir/files" ]; then
			while read -r f; do
				case "$f" in ''|'#'*) continue ;; esac
				[ -f "$REPO/linux/$f" ] || die "patches/$entry/files names linux/$f, which does not exist"
				echo "$f" >> "$listed"
				blob=$(git -C "$TREE" hash-object -w "$REPO/linux/$f")
				git -C "$TREE" update-index --add --cacheinfo "100644,$blob,$f"
			done < "$dir/files"
		fi
		tree=$(git -C "$TREE" write-tree)
		msg=$dir/message
		commit=$(GIT_AUTHOR_NAME="${JQ_AUTHOR_NAME:-Rust DRM job queue authors}" \
			GIT_AUTHOR_EMAIL="${JQ_AUTHOR_EMAIL:-jobqueue@invalid}" \
			GIT_AUTHOR_DATE="2026-11-25T00:00:00Z" \
			GIT_COMMITTER_DATE="2026-11-25T00:00:00Z" \
			git -C "$TREE" commit-tree "$tree" -p "$parent" -F "$msg")
		parent=$commit
	done < "$REPO/patches/series"
	unset GIT_INDEX_FILE
	# Every file under linux/ belongs to exactly one series entry.
	(cd "$REPO/linux" && find . -type f | sed 's|^\./||' | sort) > "$idx.have"
	sort "$listed" > "$idx.listed"
	if ! cmp -s "$idx.have" "$idx.listed"; then
		diff -u "$idx.have" "$idx.listed" | sed 's/^/  /' >&2 || true
		rm -f "$idx.have" "$idx.listed"
		die "each file under linux/ must be listed once in a patches/*/files (- unlisted, + listed twice or missing)"
	fi
	rm -f "$idx.have" "$idx.listed"
	git -C "$TREE" update-ref refs/heads/series "$parent"
	git -C "$TREE" update-ref refs/heads/mail "${mail:-$parent}"
	git -C "$TREE" checkout -q -f --detach series
	git -C "$TREE" clean -q -fdx
}

# probe_accel ROOT KERNEL: decides whether QEMU can use KVM for KERNEL (a path
# under /c), and writes "kvm" or "tcg" to $CACHE/accel for the
# qemu-system-x86_64 wrapper. /dev/kvm can exist and still hang every guest that
# enters long mode (these machines' nested hypervisor; a real-mode boot sector
# runs fine there), so the probe boots KERNEL itself with no root file system,
# under a 15-second timeout: on a working KVM it prints its banner within a
# second.
probe_accel() {
	local root=$1 kernel=$2 accel=tcg why="no usable /dev/kvm"
	if [ -w /dev/kvm ]; then
		inroot "$root" timeout 15 /usr/bin/qemu-system-x86_64 -accel kvm -nodefaults \
			-nographic -no-reboot -m 512 -serial stdio -kernel "$kernel" \
			-append 'console=ttyS0 panic=-1 kunit.enable=0 rdinit=/none root=/dev/none' \
			> "$CACHE/kvm-probe.log" 2>&1 || true
		if grep -q 'Linux version' "$CACHE/kvm-probe.log"; then
			accel=kvm why="a kernel booted on /dev/kvm"
		else
			why="a kernel did not boot on /dev/kvm within 15 s"
		fi
	fi
	echo "$accel" > "$CACHE/accel"
	log "QEMU uses $accel ($why)"
}
