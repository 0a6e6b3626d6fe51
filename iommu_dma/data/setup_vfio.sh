#!/usr/bin/env bash
# Bind NVMe controllers to vfio-pci for user-space drivers, give them back to the kernel
# nvme driver, and show their state. VFIO only (no uio): the device is always behind the IOMMU.
set -euo pipefail

PROG=$(basename "$0")
SYSFS=${SETUP_VFIO_SYSFS:-/sys}       # overridable for tests of the pure logic
DEV=${SETUP_VFIO_DEV:-/dev}
PROC=${SETUP_VFIO_PROC:-/proc}
PYTHON=${SETUP_VFIO_PYTHON:-python3}  # for the exclusive-open check (bash cannot O_EXCL)
PCI=$SYSFS/bus/pci/devices
MEMLOCK_MIN_KIB=$((256 * 1024))       # below this, DMA-heavy work fails to pin memory
FORCE=0
USER_NAME=""
HUGEPAGES=""

usage() {
    cat <<EOF
usage: $PROG [options] bind [BDF...]    bind NVMe controllers to vfio-pci
                                        (default: every NVMe controller not in use)
       $PROG [options] unbind [BDF...]  give controllers back to the kernel nvme driver
                                        (default: every NVMe controller on vfio-pci)
       $PROG status                     table of NVMe controllers and their IOMMU groups
options:
  --force          bind a controller even if one of its block devices is in use (an
                   exclusive open fails: mounted, swap, dm/md, multipath head), or unbind
                   one whose /dev/vfio node is open
  --user NAME      give NAME the /dev/vfio/N nodes (chown) and, with iommufd, the devices'
                   /dev/vfio/devices/vfioN cdevs (chown) and /dev/iommu (an ACL);
                   check NAME's memlock limit
  --hugepages N    reserve N 2 MiB hugepages
  -h, --help       this text
BDFs may be given as 0000:00:0a.0 or 00:0a.0.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
warn() { echo "$PROG: warning: $*" >&2; }
note() { echo "$PROG: $*"; }

# ---- sysfs queries -------------------------------------------------------------------------

normalize_bdf() {
    local b=$1
    [[ $b =~ ^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$ ]] && b="0000:$b"
    [[ $b =~ ^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$ ]] ||
        die "'$1' is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:0a.0)"
    echo "${b,,}"
}

driver_of() {
    local link=$PCI/$1/driver
    if [[ -e $link ]]; then basename "$(readlink -f "$link")"; else echo "-"; fi
}

group_of() {
    local link=$PCI/$1/iommu_group
    if [[ -e $link ]]; then basename "$(readlink -f "$link")"; else echo "-"; fi
}

is_nvme() { [[ $(cat "$PCI/$1/class") == 0x0108* ]]; }

nvme_bdfs() {
    local d
    for d in "$PCI"/*; do
        [[ -e $d/class ]] || continue
        is_nvme "$(basename "$d")" && basename "$d"
    done
    return 0
}

# Other devices in BDF's IOMMU group, as "BDF(driver)" words.
group_others() {
    local bdf=$1 g m out=""
    g=$(group_of "$bdf")
    [[ $g == - ]] && { echo "-"; return; }
    for m in "$SYSFS/kernel/iommu_groups/$g/devices"/*; do
        m=$(basename "$m")
        [[ $m == "$bdf" ]] || out+="$m($(driver_of "$m")) "
    done
    echo "${out:--}"
}

check_iommu() {
    local groups=("$SYSFS"/kernel/iommu_groups/*)
    [[ -e ${groups[0]} ]] || die "no IOMMU groups: the IOMMU is off. Enable VT-d/AMD-Vi in the \
firmware and add intel_iommu=on (Intel) or amd_iommu=on (AMD) to the kernel command line"
}

# Interrupt remapping: without it (virtio-iommu, an IOMMU without intremap) VFIO attaches a
# device only when the kernel was booted with the allow_unsafe_interrupts parameters.
UNSAFE_ARGS="iommufd.allow_unsafe_interrupts=1 vfio_iommu_type1.allow_unsafe_interrupts=1"

unsafe_allowed() {
    local v
    v=$(cat "$SYSFS/module/$1/parameters/allow_unsafe_interrupts" 2>/dev/null) || return 1
    [[ $v == Y || $v == 1 ]]
}

check_intremap() {
    grep -q "IR-" "$PROC/interrupts" 2>/dev/null && return 0
    if unsafe_allowed iommufd || unsafe_allowed vfio_iommu_type1; then
        warn "no interrupt remapping (virtio-iommu, or an IOMMU without intremap): VFIO attaches \
devices only because allow_unsafe_interrupts=1 is set (a device could forge interrupts; fine on \
a test bench, not on a shared machine)"
    else
        warn "no interrupt remapping (virtio-iommu, or an IOMMU without intremap): VFIO will \
refuse to attach $1 (EPERM); boot the kernel with $UNSAFE_ARGS (test benches only) or use an \
IOMMU with interrupt remapping (intel-iommu intremap=on)"
    fi
}

check_device() {
    local bdf=$1
    [[ -e $PCI/$bdf ]] || die "no PCI device $bdf (see '$PROG status' for the NVMe controllers)"
    is_nvme "$bdf" || die "$bdf is not an NVMe controller (class $(cat "$PCI/$bdf/class"), \
driver $(driver_of "$bdf")); only class 0x0108xx devices are handled"
    [[ $(group_of "$bdf") != - ]] || die "$bdf has no IOMMU group; is the IOMMU enabled for it?"
}

# ---- who uses a controller -----------------------------------------------------------------

# The controller's kernel name (nvme3) while it is on the nvme driver.
ctrl_name() {
    local c
    for c in "$PCI/$1"/nvme/nvme*; do
        [[ -e $c ]] && { basename "$c"; return 0; }
    done
    return 0
}

# Native-multipath heads the controller is a path of: the subsystem's nvmeXnY block devices
# (/sys/class/nvme-subsystem/nvme-subsysN/nvmeXnY), as sysfs directories.
multipath_heads() {
    local ctrl s h
    ctrl=$(ctrl_name "$1")
    [[ -n $ctrl ]] || return 0
    for s in "$SYSFS"/class/nvme-subsystem/nvme-subsys*; do
        [[ -e $s/$ctrl ]] || continue
        for h in "$s"/nvme*n*; do [[ -e $h/dev ]] && echo "$h"; done
    done
    return 0
}

# Every block device of an nvme-bound controller, as sysfs directories: its namespaces (per-path
# nodes nvmeXcYnZ when multipath is on), their partitions, and the multipath heads above them.
block_device_dirs() {
    local ns p
    for ns in "$PCI/$1"/nvme/nvme*/nvme*n* $(multipath_heads "$1"); do
        [[ -e $ns/dev ]] || continue
        echo "$ns"
        for p in "$ns"/"$(basename "$ns")"p*; do [[ -e $p/dev ]] && echo "$p"; done
    done
    return 0
}

# Block device names (namespaces and their partitions) for the status table.
block_devices() {
    local d
    for d in $(block_device_dirs "$1"); do basename "$d"; done
    return 0
}

# Prints one line per busy block device of the controller. A device is busy when an exclusive
# open fails with EBUSY: the kernel says so whenever it is mounted (through whatever node or
# name), used as swap, or held by dm/md/another exclusive opener. The lines say why, when
# /proc/self/mountinfo, /proc/swaps or holders/ tell (they are matched by major:minor).
# Bash cannot open with O_EXCL, so python3 does it.
block_users() {
    local dirs
    dirs=$(block_device_dirs "$1")
    [[ -n $dirs ]] || return 0
    command -v "$PYTHON" >/dev/null ||
        die "$PYTHON not found; it checks whether $1's block devices are in use (exclusive open)"
    # shellcheck disable=SC2086
    "$PYTHON" - "$PROG" "$DEV" $dirs <<'PY'
import errno, os, stat, sys, tempfile

prog, dev_dir, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]

def mounts():
    found = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                found.setdefault(fields[2], []).append(fields[4])
    except OSError:
        pass
    return found

def swaps():
    found = set()
    try:
        with open("/proc/swaps") as f:
            for line in list(f)[1:]:
                try:
                    found.add(os.stat(line.split()[0]).st_rdev)
                except OSError:
                    pass
    except OSError:
        pass
    return found

def exclusive_open(node):
    """errno of os.open(node, O_RDONLY|O_EXCL), 0 when it succeeds."""
    try:
        os.close(os.open(node, os.O_RDONLY | os.O_EXCL))
        return 0
    except OSError as e:
        return e.errno

where, swapped = mounts(), swaps()
for d in dirs:
    name = os.path.basename(d)
    with open(os.path.join(d, "dev")) as f:
        majmin = f.read().strip()
    major, minor = (int(x) for x in majmin.split(":"))
    rdev = os.makedev(major, minor)
    node = os.path.join(dev_dir, name)
    shown = node
    try:
        usable = stat.S_ISBLK(os.stat(node).st_mode) and os.stat(node).st_rdev == rdev
    except OSError:
        usable = False
    if usable:
        err = exclusive_open(node)
    else:
        # per-path nodes of a multipath head have no /dev entry: a private node does the open
        shown = f"{name} ({majmin}, no {node})"
        with tempfile.TemporaryDirectory() as tmp:
            private = os.path.join(tmp, name)
            try:
                os.mknod(private, 0o600 | stat.S_IFBLK, rdev)
            except OSError as e:
                print(f"{prog}: warning: cannot check {shown} (mknod: {e.strerror})",
                      file=sys.stderr)
                continue
            err = exclusive_open(private)
    if err == 0:
        continue
    if err != errno.EBUSY:
        print(f"{prog}: warning: cannot check {shown} (exclusive open: {os.strerror(err)})",
              file=sys.stderr)
        continue
    why = [f"is mounted on {m}" for m in where.get(majmin, [])]
    if rdev in swapped:
        why.append("is in use as swap")
    holders = os.path.join(d, "holders")
    if os.path.isdir(holders):
        why += [f"is held by {h}" for h in sorted(os.listdir(holders))]
    if not why:
        why = ["is open exclusively by another user"]
    for w in why:
        print(f"{shown} {w}")
PY
}

# PIDs with the controller's /dev/vfio/N open.
vfio_users() {
    local node=$DEV/vfio/$1 fd
    [[ -e $node ]] || return 0
    for fd in /proc/[0-9]*/fd/*; do
        [[ $(readlink "$fd" 2>/dev/null) == "$node" ]] || continue
        fd=${fd#/proc/}
        echo "pid ${fd%%/*} ($(cat "/proc/${fd%%/*}/comm" 2>/dev/null))"
    done | sort -u
}

# ---- binding -------------------------------------------------------------------------------

wait_for() {   # wait_for TEST-ARGS...: up to 10 s for a condition
    local _
    for _ in $(seq 100); do
        test "$@" && return 0
        sleep 0.1
    done
    return 1
}

rebind() {     # rebind BDF DRIVER: hand BDF to DRIVER through driver_override
    local bdf=$1 drv=$2
    if [[ $(driver_of "$bdf") != - ]]; then
        echo "$bdf" > "$PCI/$bdf/driver/unbind"
    fi
    echo "$drv" > "$PCI/$bdf/driver_override"
    echo "$bdf" > "$SYSFS/bus/pci/drivers_probe"
}

check_group_viable() {
    local bdf=$1 m drv bad=""
    for m in $(group_others "$bdf"); do
        [[ $m == - ]] && continue
        drv=${m#*(}; drv=${drv%)}
        case $drv in vfio-pci|pci-stub|pcieport|-) ;; *) bad+="${m%%(*} (driver $drv) " ;; esac
    done
    [[ -z $bad ]] && return 0
    die "IOMMU group $(group_of "$bdf") of $bdf is not viable: ${bad}also belong to it and are \
bound to host drivers; bind them to vfio-pci too (e.g. '$PROG bind' cannot do it for non-NVMe \
devices: echo vfio-pci > $PCI/BDF/driver_override)"
}

bind_one() {
    local bdf=$1 users group
    if [[ $(driver_of "$bdf") == vfio-pci ]]; then
        note "$bdf already bound to vfio-pci (group $(group_of "$bdf"))"
        [[ -n $USER_NAME ]] && give_to_user "$DEV/vfio/$(group_of "$bdf")" "$bdf"
        return 0
    fi
    users=$(block_users "$bdf")
    if [[ -n $users ]]; then
        if [[ $FORCE == 0 ]]; then
            die "$bdf is in use, refusing to take it from the kernel: $(echo "$users" | head -n1)
$users
Unmount it (umount), swapoff it or stop what holds it, then run bind again; or pass --force to \
take $bdf anyway (its users lose the device)."
        fi
        warn "$bdf is in use, taken anyway (--force): $(echo "$users" | xargs)"
    fi
    check_group_viable "$bdf"
    rebind "$bdf" vfio-pci
    group=$(group_of "$bdf")
    [[ $(driver_of "$bdf") == vfio-pci ]] ||
        die "$bdf did not bind to vfio-pci (driver now: $(driver_of "$bdf")); see dmesg"
    wait_for -e "$DEV/vfio/$group" || die "$DEV/vfio/$group did not appear for $bdf"
    note "$bdf bound to vfio-pci: IOMMU group $group, $DEV/vfio/$group"
    check_intremap "$bdf"
    [[ -n $USER_NAME ]] && give_to_user "$DEV/vfio/$group" "$bdf"
    return 0
}

unbind_one() {
    local bdf=$1 users
    if [[ $(driver_of "$bdf") != vfio-pci ]]; then
        note "$bdf is not bound to vfio-pci (driver: $(driver_of "$bdf")), left as it is"
        return 0
    fi
    users=$(vfio_users "$(group_of "$bdf")")
    if [[ -n $users && $FORCE == 0 ]]; then
        die "$DEV/vfio/$(group_of "$bdf") of $bdf is open by $users; stop it first (or --force)"
    fi
    modprobe nvme 2>/dev/null || true
    rebind "$bdf" nvme
    echo > "$PCI/$bdf/driver_override"
    [[ $(driver_of "$bdf") == nvme ]] ||
        die "$bdf did not bind to nvme (driver now: $(driver_of "$bdf")); see dmesg"
    note "$bdf given back to the kernel nvme driver"
}

# ---- --user and --hugepages ----------------------------------------------------------------

give_to_user() {
    local node=$1 bdf=$2 limit
    chown -- "$USER_NAME" "$node"
    note "$node now belongs to $USER_NAME"
    give_iommufd_to_user "$bdf"
    limit=$(su -s /bin/sh "$USER_NAME" -c 'ulimit -l' 2>/dev/null) || limit=unknown
    if [[ $limit != unlimited && ( $limit == unknown || $limit -lt $MEMLOCK_MIN_KIB ) ]]; then
        warn "$USER_NAME's RLIMIT_MEMLOCK is ${limit} KiB; DMA memory is pinned and counts \
against it, so mapping more than that will fail. Raise it: add '$USER_NAME - memlock unlimited' \
to /etc/security/limits.conf (new login), or LimitMEMLOCK=infinity for a systemd service, or \
'prlimit --memlock=unlimited --pid PID'"
    fi
}

# The VFIO cdev of a device (Linux 6.2+, CONFIG_VFIO_DEVICE_CDEV): /dev/vfio/devices/vfioN, named
# by $PCI/BDF/vfio-dev/vfioN; nothing when the kernel has none.
cdev_of() {
    local d
    for d in "$PCI/$1"/vfio-dev/vfio*; do
        [[ -e $d ]] && echo "$DEV/vfio/devices/${d##*/}" && return 0
    done
    return 1
}

# iommufd: the user opens /dev/iommu (shared: on its own it grants no device, and what a user
# pins counts against its RLIMIT_MEMLOCK) and the device's cdev (chown, like the group node).
# Without them iommu-dma uses the legacy container for that user.
give_iommufd_to_user() {
    local bdf=$1 cdev
    cdev=$(cdev_of "$bdf") || return 0
    wait_for -e "$cdev" || { warn "$cdev of $bdf did not appear"; return 0; }
    chown -- "$USER_NAME" "$cdev"
    note "$cdev now belongs to $USER_NAME"
    [[ -e $DEV/iommu ]] || return 0
    if ! command -v setfacl >/dev/null; then
        warn "setfacl is missing (Debian package acl): $USER_NAME cannot open $DEV/iommu, so \
iommu-dma will use the legacy VFIO container for $USER_NAME; install acl and bind again"
    elif setfacl -m "u:$USER_NAME:rw" "$DEV/iommu" 2>/dev/null; then
        note "$DEV/iommu is now read-write for $USER_NAME (ACL)"
    else
        warn "could not give $USER_NAME $DEV/iommu (setfacl failed: no ACLs on /dev?); \
iommu-dma will use the legacy VFIO container for $USER_NAME"
    fi
}

reserve_hugepages() {
    local f=$SYSFS/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages got
    [[ -e $f ]] || die "this kernel has no 2 MiB hugepages ($f missing)"
    echo "$HUGEPAGES" > "$f"
    got=$(cat "$f")
    if [[ $got -lt $HUGEPAGES ]]; then
        warn "asked for $HUGEPAGES 2 MiB hugepages, the kernel reserved $got (memory is fragmented \
or short; reserve them at boot with hugepages=$HUGEPAGES)"
    else
        note "$got 2 MiB hugepages reserved"
    fi
}

# ---- commands ------------------------------------------------------------------------------

cmd_bind() {
    local bdfs=("$@") b users
    check_iommu
    modprobe vfio-pci 2>/dev/null || [[ -d $SYSFS/bus/pci/drivers/vfio-pci ]] ||
        die "cannot load the vfio-pci module (modprobe vfio-pci failed)"
    if [[ ${#bdfs[@]} -eq 0 ]]; then
        for b in $(nvme_bdfs); do
            if [[ $FORCE == 0 && $(driver_of "$b") != vfio-pci ]]; then
                users=$(block_users "$b")
                if [[ -n $users ]]; then
                    note "skipping $b: in use ($(echo "$users" | head -n1)); unmount it, or \
name it with --force"
                    continue
                fi
            fi
            bdfs+=("$b")
        done
        [[ ${#bdfs[@]} -gt 0 ]] || die "no NVMe controller is free to bind"
    fi
    for b in "${bdfs[@]}"; do check_device "$b"; done
    for b in "${bdfs[@]}"; do bind_one "$b"; done
}

cmd_unbind() {
    local bdfs=("$@") b
    if [[ ${#bdfs[@]} -eq 0 ]]; then
        for b in $(nvme_bdfs); do
            [[ $(driver_of "$b") == vfio-pci ]] && bdfs+=("$b")
        done
        [[ ${#bdfs[@]} -gt 0 ]] || { note "no NVMe controller is bound to vfio-pci"; return 0; }
    fi
    for b in "${bdfs[@]}"; do check_device "$b"; done
    for b in "${bdfs[@]}"; do unbind_one "$b"; done
}

cmd_status() {
    local b group node owner fmt="%-13s %-10s %-9s %-6s %-14s %-28s %s\n"
    # shellcheck disable=SC2059
    printf "$fmt" BDF VEN:DEV DRIVER GROUP VFIO-NODE GROUP-MEMBERS BLOCK
    for b in $(nvme_bdfs); do
        group=$(group_of "$b")
        node="-"; owner=""
        if [[ $group != - && -e $DEV/vfio/$group ]]; then
            node=$DEV/vfio/$group
            owner="($(stat -c %U "$node"))"
        fi
        # shellcheck disable=SC2059
        printf "$fmt" "$b" "$(cut -c3-6 "$PCI/$b/vendor"):$(cut -c3-6 "$PCI/$b/device")" \
            "$(driver_of "$b")" "$group" "$node$owner" "$(group_others "$b" | xargs | tr ' ' ,)" \
            "$(block_devices "$b" | xargs | tr ' ' , | sed 's/^$/-/')"
    done
    [[ -e ${SYSFS}/kernel/iommu_groups/0 ]] || warn "no IOMMU groups: the IOMMU is off \
(add intel_iommu=on or amd_iommu=on to the kernel command line)"
    return 0
}

# A user name or numeric uid, never an option: '--user -G' must not pass '-G' on to id/chown/su.
check_user_name() {
    [[ -n $1 ]] || die "--user needs a user name"
    [[ $1 =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$ ]] ||
        die "'$1' is not a user name (--user NAME, e.g. --user alice)"
}

main() {
    local cmd="" args=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --force) FORCE=1 ;;
            --user) [[ $# -ge 2 ]] || die "--user needs a user name"; USER_NAME=$2; shift
                    check_user_name "$USER_NAME" ;;
            --user=*) USER_NAME=${1#--user=}; check_user_name "$USER_NAME" ;;
            --hugepages) [[ $# -ge 2 ]] || die "--hugepages needs a count"; HUGEPAGES=$2; shift ;;
            --hugepages=*) HUGEPAGES=${1#--hugepages=} ;;
            -h|--help) usage; exit 0 ;;
            -*) echo "$PROG: unknown option $1" >&2; usage >&2; exit 2 ;;
            *) if [[ -z $cmd ]]; then cmd=$1; else args+=("$(normalize_bdf "$1")"); fi ;;
        esac
        shift
    done
    if [[ -n $USER_NAME ]] && ! id -- "$USER_NAME" >/dev/null 2>&1; then
        die "no such user '$USER_NAME'"
    fi
    if [[ -n $HUGEPAGES && ! $HUGEPAGES =~ ^[0-9]+$ ]]; then
        die "--hugepages wants a number of 2 MiB pages, not '$HUGEPAGES'"
    fi
    case $cmd in
        bind|unbind) [[ $(id -u) == 0 ]] || die "$cmd needs root (sysfs writes)" ;;
    esac
    [[ -n $HUGEPAGES ]] && reserve_hugepages
    case $cmd in
        bind) cmd_bind "${args[@]+"${args[@]}"}" ;;
        unbind) cmd_unbind "${args[@]+"${args[@]}"}" ;;
        status) cmd_status ;;
        "") [[ -n $HUGEPAGES ]] || { usage >&2; exit 2; } ;;
        *) echo "$PROG: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
    esac
}

main "$@"
