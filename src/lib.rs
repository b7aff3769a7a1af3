//! gpupass gives virtual machines whole GPUs on KVM/libvirt hosts: it discovers every GPU and all
//! its functions from sysfs (through a host root), judges whether each can be passed through,
//! composes `<hostdev>` XML, and attaches/detaches whole GPUs through libvirt under a host lock.
//!
//! ```
//! use gpupass::model::PciAddress;
//! use gpupass::xml::compose::HostdevTemplate;
//!
//! let addr: PciAddress = "0000:61:00.1".parse().unwrap();
//! let xml = HostdevTemplate::builtin().render(addr);
//! assert!(xml.contains("bus='0x61' slot='0x00' function='0x1'"));
//! assert!("../etc/passwd".parse::<PciAddress>().is_err());
//! ```
#![warn(missing_docs)]

#[cfg(feature = "agent")]
pub mod agent;
pub mod alloc;
pub mod assign;
pub mod bind;
pub mod cloudstack;
pub mod config;
pub mod cpuset;
pub mod fit;
pub mod fsutil;
pub mod health;
pub mod hook;
pub mod host;
pub mod hostcfg;
pub mod libvirt;
pub mod limits;
pub mod model;
pub mod observability;
pub mod refit;
#[cfg(feature = "pci-names")]
pub mod report;
pub mod request;
pub mod usage;
pub mod xml;
