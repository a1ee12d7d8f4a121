# shellcheck shell=bash
# The guest image in Glance, as an operator would upload it for Nova: the kernel (aki) and
# initramfs (ari) it boots by, and the root disk twice, raw (Nova clones it into its pool)
# and qcow2 (Nova cannot clone that: it downloads, converts and imports a full copy).
# Built by guest-image.sh from Debian packages.

# shellcheck source=guest-image.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-image.sh"

IMAGES_ENV=$STATE/images.env
IMAGE_NAMES=(novasnap-guest-kernel novasnap-guest-ramdisk novasnap-guest novasnap-guest-qcow2)

# image_field NAME: from images.env.
image_field() { sed -n "s/^$1=//p" "$IMAGES_ENV" 2>/dev/null; }

# What the uploads were made from: the built files, in this Ceph cluster.
images_recipe() { echo "$(sed -n 's/^recipe=//p' "$GUEST_IMAGE_DIR/recipe") $(cat "$CEPH_DIR/generation")"; }

# The uploads are of this build in this cluster: a quick look, no Glance call.
images_current() { [ "$(image_field RECIPE)" = "$(images_recipe)" ]; }

images_ok() {
  images_current || return 1
  local key
  for key in KERNEL_ID RAMDISK_ID IMAGE_ID QCOW2_IMAGE_ID; do
    [ "$(os_admin image show "$(image_field "$key")" -f value -c status 2>/dev/null)" = active ] || return 1
  done
}

# upload NAME DISK CONTAINER FILE [PROPERTY...]: a public image; prints its id.
upload() {
  local name=$1 disk=$2 container=$3 file=$4; shift 4
  local props=() p
  for p in "$@"; do props+=(--property "$p"); done
  os_admin image create --public --disk-format "$disk" --container-format "$container" --file "$file" \
    "${props[@]}" "$name" -f value -c id
}

image_up() {
  local t0=$SECONDS
  guest_image_build
  images_current && return 0
  say "image: uploading the guest to Glance"
  # Servers cloned from the old images keep them in use: they are made again from the new.
  servers_stop
  local name id
  for name in "${IMAGE_NAMES[@]}"; do
    for id in $(os_admin image list --name "$name" -f value -c ID); do os_admin image delete "$id"; done
  done
  local kernel ramdisk raw qcow2
  kernel=$(upload novasnap-guest-kernel aki aki "$GUEST_IMAGE_DIR/vmlinuz")
  ramdisk=$(upload novasnap-guest-ramdisk ari ari "$GUEST_IMAGE_DIR/initrd.img")
  local boot=("kernel_id=$kernel" "ramdisk_id=$ramdisk" "os_command_line=$GUEST_IMAGE_CMDLINE" hw_qemu_guest_agent=yes)
  raw=$(upload novasnap-guest raw bare "$GUEST_IMAGE_DIR/disk.raw" "${boot[@]}")
  qemu-img convert -O qcow2 "$GUEST_IMAGE_DIR/disk.raw" "$GUEST_IMAGE_DIR/disk.qcow2"
  qcow2=$(upload novasnap-guest-qcow2 qcow2 bare "$GUEST_IMAGE_DIR/disk.qcow2" "${boot[@]}")
  rm -f "$GUEST_IMAGE_DIR/disk.qcow2"
  cat >"$IMAGES_ENV" <<EOC
KERNEL_ID=$kernel
RAMDISK_ID=$ramdisk
IMAGE_ID=$raw
QCOW2_IMAGE_ID=$qcow2
RECIPE=$(images_recipe)
EOC
  say "image up ($((SECONDS - t0))s)"
}

image_status() { guest_image_status && images_ok; }

# The images go with Glance's database and Ceph.
image_stop() { rm -f "$IMAGES_ENV"; }
