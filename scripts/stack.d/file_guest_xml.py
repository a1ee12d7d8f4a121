"""Server 1's domain XML as Nova wrote it (stdin) → the file-backed guest's (stdout).

Changed: name and uuid (it runs beside server 1; the SMBIOS uuid follows), the root disk (a qcow2 file), the kernel
and initramfs paths and the console log (files of its own), and the host paths libvirt
generated for the agent's channel (it makes new ones). Everything else stays Nova's.
"""
import argparse
import sys
import xml.etree.ElementTree as ET

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--name", required=True)
p.add_argument("--uuid", required=True)
p.add_argument("--dir", required=True, help="the file guest's directory")
p.add_argument("--server-dir", required=True, help="server 1's instance directory")
a = p.parse_args()

ET.register_namespace("nova", "http://openstack.org/xmlns/libvirt/nova/1.1")
tree = ET.parse(sys.stdin)
domain = tree.getroot()
domain.find("name").text = a.name
domain.find("uuid").text = a.uuid
for entry in domain.iterfind("sysinfo/system/entry[@name='uuid']"):
    entry.text = a.uuid  # libvirt wants the SMBIOS uuid to be the domain's
for element in domain.iter():
    for attr, value in list(element.attrib.items()):
        if a.server_dir in value:
            element.set(attr, value.replace(a.server_dir, a.dir))
    if element.text and a.server_dir in element.text:
        element.text = element.text.replace(a.server_dir, a.dir)
devices = domain.find("devices")
root = next(d for d in devices.findall("disk") if d.get("device") == "disk")
for child in list(root):
    if child.tag not in ("target", "alias", "address"):
        root.remove(child)
root.attrib.clear()
root.set("type", "file")
root.set("device", "disk")
ET.SubElement(root, "driver", name="qemu", type="qcow2", cache="none")
ET.SubElement(root, "source", file=f"{a.dir}/disk")
for channel in devices.findall("channel"):
    source = channel.find("source")
    if source is not None and "path" in source.attrib:
        del source.attrib["path"]
# The domain's Nova identity stays server 1's: no Nova record has this uuid.
sys.stdout.write(ET.tostring(domain, encoding="unicode"))
