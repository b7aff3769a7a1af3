//! The host's PCI devices: reading sysfs under a host root (`sysfs`), building the inventory of
//! whole GPUs (`discover`), judging whether each can be passed through (`readiness`), the
//! host's readiness as a whole (`probe` gathers, `doctor` judges), the fractions its GPUs
//! offer: SR-IOV VFs, mdev types and instances (`vgpu`), and the host's own PCI names
//! (`pci_ids`).

pub mod discover;
pub mod doctor;
pub mod pci_ids;
pub mod probe;
pub mod readiness;
pub mod sysfs;
pub mod vgpu;
