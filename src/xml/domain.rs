//! The facts gpupass needs from a libvirt domain XML (or libvirt's status XML): name, UUID, the
//! PCI hostdevs it references, where it is pinned, its owner. Read through the same scanner
//! that `transform` uses (`xml::rewrite`); read-only.

use quick_xml::events::BytesStart;

use crate::model::{MdevUuid, PciAddress};
use crate::xml::rewrite::scan_status;
use crate::xml::{attr, XmlError};

/// The facts of one domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFacts {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: Option<String>,
    /// Source addresses of `<hostdev mode='subsystem' type='pci'>` in `<devices>`, in order.
    pub pci_hostdevs: Vec<PciAddress>,
    /// Source UUIDs of `<hostdev mode='subsystem' type='mdev'>` in `<devices>`, in order.
    pub mdev_hostdevs: Vec<MdevUuid>,
    /// `<numatune><memory nodeset=…>`.
    pub numa_nodeset: Option<String>,
    /// `<vcpu cpuset=…>`.
    pub vcpu_cpuset: Option<String>,
    /// `<cputune><vcpupin cpuset=…>` values.
    pub vcpupin_cpusets: Vec<String>,
    /// `owner` of the gpupass request in `<metadata>`.
    pub owner: Option<String>,
}

/// Reads the facts of a domain XML, or of libvirt's status XML (`<domstatus>`).
pub fn parse(xml: &str) -> Result<DomainFacts, XmlError> {
    let doc = scan_status(xml)?;
    Ok(DomainFacts {
        pci_hostdevs: doc.pci_sources(),
        mdev_hostdevs: doc.mdev_sources(),
        owner: doc.request.as_ref().and_then(|r| r.owner.clone()),
        numa_nodeset: doc.pinning.numa_nodeset,
        vcpu_cpuset: doc.pinning.vcpu_cpuset,
        vcpupin_cpusets: doc.pinning.vcpupin_cpusets,
        name: doc.name,
        uuid: doc.uuid,
    })
}

/// Parses a libvirt number the way libvirt does (`strtoul` base 0): `0x..` hex, leading `0`
/// octal, otherwise decimal.
fn c_uint(s: &str) -> Option<u32> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The PCI address in an `<address domain bus slot function>` element, when complete and in range.
pub(crate) fn pci_address_of(e: &BytesStart<'_>) -> Result<Option<PciAddress>, XmlError> {
    let part =
        |n: &[u8]| -> Result<Option<u32>, XmlError> { Ok(attr(e, n)?.as_deref().and_then(c_uint)) };
    let (Some(bus), Some(slot), Some(function)) =
        (part(b"bus")?, part(b"slot")?, part(b"function")?)
    else {
        return Ok(None);
    };
    let domain = part(b"domain")?.unwrap_or(0);
    Ok(u8::try_from(bus)
        .ok()
        .zip(u8::try_from(slot).ok())
        .zip(u8::try_from(function).ok())
        .and_then(|((b, s), f)| PciAddress::new(domain, b, s, f)))
}

/// The PCI source address of a single `<hostdev>` fragment (as composed from a template).
pub fn hostdev_source(fragment: &str) -> Result<Option<PciAddress>, XmlError> {
    let wrapped = format!("<domain><name>fragment</name><devices>{fragment}</devices></domain>");
    Ok(parse(&wrapped)?.pci_hostdevs.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm&amp;1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <vcpu placement='static' cpuset='56-59'>4</vcpu>
  <numatune><memory mode='strict' nodeset='1'/></numatune>
  <cputune><vcpupin vcpu='0' cpuset='56'/></cputune>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source><address domain='0x0000' bus='0x9a' slot='0x00' function='0x0'/></source>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci'>
      <source><address domain='1' bus='10' slot='0x1f' function='7'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='usb'>
      <source><address bus='1' device='2'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='off'>
      <source><address uuid='4B20D080-1b54-4048-85b3-a6a62d165c01'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='not-a-uuid'/></source>
    </hostdev>
    <interface type='hostdev'>
      <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x00' function='0x2'/></source>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn reads_hostdevs_and_pinning() {
        let f = parse(XML).unwrap();
        assert_eq!(f.name, "vm&1");
        assert_eq!(
            f.uuid.as_deref(),
            Some("c7a5fdbd-edaf-9455-926a-d65c16db1809")
        );
        let addrs: Vec<String> = f.pci_hostdevs.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["0000:9a:00.0", "0001:0a:1f.7"]);
        // The mdev's UUID, lowercased; one libvirt would refuse is no source.
        let mdevs: Vec<&str> = f.mdev_hostdevs.iter().map(|u| u.as_str()).collect();
        assert_eq!(mdevs, ["4b20d080-1b54-4048-85b3-a6a62d165c01"]);
        assert_eq!(f.numa_nodeset.as_deref(), Some("1"));
        assert_eq!(f.vcpu_cpuset.as_deref(), Some("56-59"));
        assert_eq!(f.vcpupin_cpusets, ["56"]);
    }

    #[test]
    fn reads_status_xml_and_rejects_other_roots() {
        let status = format!("<domstatus state='running' pid='1'>{XML}</domstatus>");
        assert_eq!(parse(&status).unwrap().pci_hostdevs.len(), 2);
        assert!(parse("<network><name>x</name></network>").is_err());
        assert!(parse("<domain><devices></domain>").is_err());
        assert!(parse("<domain><devices>").is_err());
    }

    #[test]
    fn numbers_parse_like_libvirt() {
        assert_eq!(c_uint("0x1f"), Some(31));
        assert_eq!(c_uint("010"), Some(8));
        assert_eq!(c_uint("10"), Some(10));
        assert_eq!(c_uint("0"), Some(0));
        assert_eq!(c_uint("zz"), None);
    }
}
