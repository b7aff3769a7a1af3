//! The host's PCI devices: reading sysfs under a host root (`sysfs`), building the inventory of
//! whole GPUs (`discover`), and judging whether each can be passed through (`readiness`).

pub mod discover;
pub mod readiness;
pub mod sysfs;
