#!/usr/bin/env python3
"""The seeds' job done the usual Python way, as a benchmark peer: parse the domain XML from stdin
with xml.etree, append one fixed <hostdev> to <devices>, print the XML."""
import sys
import xml.etree.ElementTree as ET

root = ET.fromstring(sys.stdin.read())
devices = root.find("devices")
hostdev = ET.SubElement(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
ET.SubElement(hostdev, "driver", name="vfio")
source = ET.SubElement(hostdev, "source")
ET.SubElement(source, "address", domain="0x0000", bus="0x9a", slot="0x00", function="0x0")
sys.stdout.write(ET.tostring(root, encoding="unicode"))
