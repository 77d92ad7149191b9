#!/usr/bin/env bash
# Builds a Debian Vagrant box for the libvirt provider on this machine, for
# places where no box can be downloaded (no Vagrant Cloud, no registry; only
# a Debian mirror).
#
#   vagrant/build-box.sh [--with-docker] bookworm|bullseye OUT_DIR [MIRROR]
#
# writes OUT_DIR/mlops-<suite>.box (mlops-<suite>-docker.box with
# --with-docker); add it with
#   vagrant box add --name mlops/<suite> OUT_DIR/mlops-<suite>.box
#
# The box is what a standard Debian box is, and nothing more: a minimal
# Debian with its kernel, systemd, ifupdown with DHCP on the first NIC,
# OpenSSH, sudo, and the user `vagrant` (passwordless sudo, Vagrant's
# well-known insecure key, which `vagrant up` replaces with a key of its
# own). No Docker, no agent: installing those is what the tests watch
# mlopsctl do. `--with-docker` adds Debian's docker.io (enabled, started at
# boot): a host that runs Docker already, whose engine the agent uses as it
# is (the VM tier's vm2, which saves installing it under emulation).
#
# The disk is a bare ext4 file system (made with `mkfs.ext4 -d`, which needs
# no loop device) with no partition table and no boot loader, so the box
# boots its kernel directly: vmlinuz and initrd.img travel in the box, and
# the box's own Vagrantfile points libvirt at them. SSH host keys are not
# in the box; each VM makes its own at first boot.
#
# MIRROR defaults to the first Debian mirror this machine's apt uses. Needs
# root, debootstrap and qemu-utils (qemu-img). About 1.5 minutes per box.
set -euo pipefail

with_docker=
if [ "${1:-}" = --with-docker ]; then
  with_docker=1
  shift
fi
suite=${1:-}
out=${2:-}
if [ -z "$suite" ] || [ -z "$out" ]; then
  echo "usage: $0 [--with-docker] bookworm|bullseye OUT_DIR [MIRROR]" >&2
  exit 2
fi
case "$suite" in
  bookworm | bullseye) ;;
  *)
    echo "error: unsupported suite \`$suite\`" >&2
    echo "  hint: the VM tier uses bookworm (Debian 12) and bullseye (Debian 11)" >&2
    exit 2
    ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "error: building a box needs root (debootstrap, chroot)" >&2
  exit 2
fi
for tool in debootstrap qemu-img mkfs.ext4; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: \`$tool\` is missing" >&2
    echo "  hint: apt-get install debootstrap qemu-utils e2fsprogs" >&2
    exit 2
  }
done

mirror=${3:-}
if [ -z "$mirror" ]; then
  # The `URIs:` of the deb822 sources, else the first `deb` line; the first
  # one that is not a security mirror.
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
mirror=${mirror%/}
security=${mirror%/debian}/debian-security
insecure_key=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*keys/vagrant.pub' 2>/dev/null | head -1 || true)
if [ -z "$insecure_key" ]; then
  echo "error: Vagrant's insecure public key (keys/vagrant.pub) was not found" >&2
  echo "  hint: apt-get install vagrant" >&2
  exit 2
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.build-$suite.XXXXXX")
root="$work/root"
# Whatever is mounted under the tree is unmounted first, and the removal
# never crosses into another file system.
trap 'findmnt -rno TARGET | grep "^$work/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true; rm -rf --one-file-system "$work"' EXIT

echo "box $suite: debootstrap from $mirror"
debootstrap --variant=minbase \
  --include=systemd-sysv,dbus,udev,ifupdown,isc-dhcp-client,openssh-server,sudo,ca-certificates,iproute2,procps,kmod,less \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -30 "$work/debootstrap.log" >&2
  echo "error: debootstrap of $suite from $mirror failed (the log's end is above)" >&2
  echo "  hint: name a reachable Debian mirror as the third argument" >&2
  exit 1
}

# No service starts inside the chroot while packages are installed.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
echo "box $suite: kernel and initramfs"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  linux-image-amd64 initramfs-tools >"$work/kernel.log" 2>&1 || {
  tail -30 "$work/kernel.log" >&2
  echo "error: installing the kernel in the $suite tree failed (the log's end is above)" >&2
  exit 1
}
if [ -n "$with_docker" ]; then
  echo "box $suite: docker.io"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    docker.io apparmor >"$work/docker.log" 2>&1 || {
    tail -30 "$work/docker.log" >&2
    echo "error: installing docker.io in the $suite tree failed (the log's end is above)" >&2
    exit 1
  }
fi
chroot "$root" apt-get clean
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF
echo "$suite" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$suite" >"$root/etc/hosts"
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$root/etc/fstab"
cat >"$root/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF
# Each VM gets its own machine id and SSH host keys at first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
EOF
mkdir -p "$root/etc/systemd/system/ssh.service.requires"
ln -s ../ssh-host-keys.service "$root/etc/systemd/system/ssh.service.requires/ssh-host-keys.service"
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
# A serial console, for the boot log libvirt keeps.
mkdir -p "$root/etc/systemd/system/getty.target.wants"
ln -sf /lib/systemd/system/serial-getty@.service "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"

chroot "$root" useradd --create-home --shell /bin/bash vagrant
echo 'vagrant:vagrant' | chroot "$root" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$insecure_key" "$root/home/vagrant/.ssh/authorized_keys"

box="$work/box"
mkdir -p "$box"
cp -L "$root/vmlinuz" "$box/vmlinuz"
cp -L "$root/initrd.img" "$box/initrd.img"
rm -rf "$root/var/lib/apt/lists"/* "$root/var/cache/apt"/*.bin

echo "box $suite: disk image"
truncate -s 8G "$work/disk.raw"
mkfs.ext4 -q -L root -d "$root" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$box/box.img"
rm -f "$work/disk.raw"

echo '{"provider":"libvirt","format":"qcow2","virtual_size":8}' >"$box/metadata.json"
# The box's own Vagrantfile: boot the kernel that travels with the box.
cat >"$box/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.join(__dir__, "vmlinuz")
    libvirt.initrd = File.join(__dir__, "initrd.img")
    libvirt.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0"
  end
end
EOF
name=mlops-$suite${with_docker:+-docker}.box
tar -C "$box" -cf "$work/$name" metadata.json Vagrantfile box.img vmlinuz initrd.img
mv "$work/$name" "$out/$name"
echo "box $suite: $out/$name ($(du -h "$out/$name" | cut -f1))"
