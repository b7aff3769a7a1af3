#!/usr/bin/env python3
"""Writes bench/domain-10k.xml: a realistic ~10 KB CloudStack-style domain (disks, NICs,
controllers, channels) with a gpupass request for 2 H100s pinned to NUMA node 1."""
import os

HEAD = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>i-2-34-VM</name>
  <uuid>5b1d4f9e-2b4c-4a8e-9d6f-7c3e2a1b0c9d</uuid>
  <description>Ubuntu 22.04 GPU worker (bench input)</description>
  <metadata>
    <gpupass:gpus xmlns:gpupass="https://gpupass.dev/xmlns/1" count="2" model="10de:2330"/>
  </metadata>
  <memory unit='KiB'>67108864</memory>
  <currentMemory unit='KiB'>67108864</currentMemory>
  <vcpu placement='static' cpuset='56-71'>16</vcpu>
  <cputune>
    <shares>16000</shares>
  </cputune>
  <numatune>
    <memory mode='strict' nodeset='1'/>
  </numatune>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Apache Software Foundation</entry>
      <entry name='product'>CloudStack KVM Hypervisor</entry>
      <entry name='uuid'>5b1d4f9e-2b4c-4a8e-9d6f-7c3e2a1b0c9d</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
    <smbios mode='sysinfo'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <pae/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'>
    <topology sockets='1' dies='1' cores='16' threads='1'/>
  </cpu>
  <clock offset='utc'>
    <timer name='kvmclock'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
"""

TAIL = """    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/i-2-34-VM.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='10.0.0.5' passwd='xxxxxxxx'>
      <listen type='address' address='10.0.0.5'/>
    </graphics>
    <video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
    </video>
    <watchdog model='i6300esb' action='none'/>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def main() -> None:
    parts = [HEAD]
    for i, dev in enumerate("abcdefghijkl"):
        parts.append(f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>
      <source file='/mnt/3f1b2c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/0b7e6a9c-{i:04d}-4d2e-8f1a-2c3b4d5e6f70'/>
      <target dev='vd{dev}' bus='virtio'/>
      <serial>0b7e6a9c{i:04d}4d2e8f1a</serial>
      <iotune>
        <total_iops_sec>5000</total_iops_sec>
      </iotune>
      <address type='pci' domain='0x0000' bus='0x{i + 3:02x}' slot='0x00' function='0x0'/>
    </disk>
""")
    for i in range(6):
        parts.append(f"""    <interface type='bridge'>
      <mac address='1e:00:a2:00:00:{i:02x}'/>
      <source bridge='breth{i}-1{i}0'/>
      <bandwidth>
        <inbound average='25600000' peak='25600000'/>
        <outbound average='25600000' peak='25600000'/>
      </bandwidth>
      <model type='virtio'/>
      <link state='up'/>
    </interface>
""")
    parts.append(TAIL)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "domain-10k.xml")
    with open(path, "w") as f:
        f.write("".join(parts))


if __name__ == "__main__":
    main()
