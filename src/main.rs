//! The `gpupass` binary: parses arguments (clap), dispatches to `cli/`, and maps every failure
//! to one line on stderr and a documented exit code.

mod cli;

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};

use gpupass::alloc::lock::LockError;
use gpupass::alloc::plan::{AttachRequest, DetachRequest};
use gpupass::alloc::AllocError;
use gpupass::assign::AssignError;
use gpupass::bind::sriov::SriovError;
use gpupass::bind::BindError;
use gpupass::config::ConfigError;
use gpupass::health::HealthError;
use gpupass::hook::cli::{one_line, Dirs, HookCommand};
use gpupass::host::doctor::ChecksFailed;
use gpupass::host::sysfs::SysfsError;
use gpupass::hostcfg::HostConfigError;
use gpupass::libvirt::LibvirtError;
use gpupass::model::{ModelError, PciAddress, PciId};
use gpupass::xml::XmlError;

use crate::cli::assign::AssignFlags;
use crate::cli::Global;

const EXIT_CODES: &str = "\
Exit codes:
   0  success
   1  internal error, or the host root could not be read
   2  bad usage or input: malformed PCI address or ID, bad flag, invalid config or template
   3  unknown GPU, or the GPU is not attached to that domain; sriov: a VF's address, or
      --undo with nothing recorded
   4  unknown domain
   5  GPU (or NVSwitch, --hgx-full) in use by another domain, or already attached to this one;
      sriov: the PF passed whole, or a VF that would go in a domain
   6  not enough free, passable GPUs (--count), or no NVSwitch on this host (--hgx-full)
   7  GPU or NVSwitch cannot be passed through (IOMMU off, IOMMU group shared with a host
      device, quarantined)
   8  libvirt unreachable, or it did not answer within --libvirt-timeout
   9  libvirt refused the change (its message is shown)
  10  libvirt accepted the change but the domain XML does not show it (rolled back); bind,
      sriov: the kernel did not do what was written (put back)
  11  a failure whose rollback also failed: check the domain by hand
  12  timed out waiting for the host lock (another gpupass is attaching or detaching)
  13  doctor: a check failed
  14  bind refused for safety (the host's console, a device the host uses; --force);
      sriov: VFs gpupass did not make, or a count change (through 0), refused (--force)
  15  the domain's owner would exceed its GPU limit or GPU-hours (config [limits])
  16  fit: the domain lacks what its GPUs need (`gpupass fit DOMAIN --apply` adds it)
  17  fit: the GPUs cannot work in the domain on this host (e.g. the host CPU's address bits)
  18  health: a GPU failed its health check (it is quarantined) or still fails after --recover,
      or `quarantine clear` found it still failing (--force clears it anyway)
The qemu hook exits 1 when it blocks a start (`prepare`) or cannot rewrite (`migrate`/`restore`).";

/// Give virtual machines whole GPUs on KVM/libvirt hosts.
///
/// gpupass finds every GPU of the host with all its functions (audio, USB, UCSI), judges whether
/// each can be passed through with VFIO, prints the libvirt <hostdev> XML for it, and attaches or
/// detaches whole GPUs to libvirt domains without ever giving one GPU to two domains.
#[derive(Debug, Parser)]
#[command(name = "gpupass", version, after_long_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    dirs: Dirs,

    /// libvirt connection URI.
    #[arg(
        short = 'c',
        long = "connect",
        env = "LIBVIRT_DEFAULT_URI",
        default_value = "qemu:///system",
        global = true,
        value_name = "URI"
    )]
    connect: String,

    /// More log output on stderr (-v info, -vv debug); GPUPASS_LOG takes an env-filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Libvirt(LibvirtCommand),
    #[command(flatten)]
    HookMode(HookCommand),
}

/// The commands that talk to libvirt (or may: `list`, `show`).
#[derive(Debug, Subcommand)]
enum LibvirtCommand {
    /// List the host's GPUs: functions, IOMMU group, NUMA node, driver, verdict, user.
    ///
    /// Works without libvirt (USED BY shows '?', JSON used_by is null, and a warning says why).
    #[command(
        after_help = "Examples:\n  gpupass list\n  gpupass list --json | jq '.gpus[] | select(.viable and .used_by == null) | .address'"
    )]
    List {
        /// Print JSON: {"gpus":[…],"iommu":{…},"libvirt":{…}}.
        #[arg(long)]
        json: bool,
        /// Do not ask libvirt who uses each GPU.
        #[arg(long)]
        no_libvirt: bool,
    },
    /// Show one GPU in full: every function, its IOMMU group members, blockers, user.
    #[command(after_help = "Example:\n  gpupass show 0000:18:00.0 --json")]
    Show {
        /// The GPU, or any of its functions (DDDD:BB:SS.F).
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Do not ask libvirt who uses the GPU.
        #[arg(long)]
        no_libvirt: bool,
    },
    /// Check that the host is ready for GPU passthrough: IOMMU, vfio, each GPU, libvirt, the hook.
    ///
    /// Each check says ok / warn / FAIL / skip, what was seen, and the fix in one line. Reads
    /// only; exit 13 when a check fails.
    #[command(
        after_help = "Examples:\n  gpupass doctor\n  gpupass doctor --gpu 0000:18:00.0 --json"
    )]
    Doctor {
        /// Only these GPUs (host-wide checks always run).
        #[arg(long = "gpu", value_name = "ADDR", num_args = 1..)]
        gpus: Vec<PciAddress>,
        /// Print JSON: {"checks":[{"name","status","seen","fix"}],"ok","warn","fail","skipped"}.
        #[arg(long)]
        json: bool,
        /// Do not ask libvirt.
        #[arg(long)]
        no_libvirt: bool,
    },
    /// What the host needs so the chosen GPUs come up on vfio-pci at boot: modprobe options and
    /// softdeps, the initramfs module list, the kernel command-line words.
    ///
    /// Without --apply it shows the files as a diff against what is there and writes nothing.
    /// With --apply it writes them atomically, keeping a copy of what it replaces; it never runs
    /// update-initramfs, dracut or update-grub, nor reboots: it prints what is still to do.
    #[command(
        after_help = "Examples:\n  gpupass host-config --model 10de:11b4\n  gpupass host-config --gpu 0000:03:00.0 --apply"
    )]
    HostConfig {
        /// These GPUs (all their functions).
        #[arg(long = "gpu", value_name = "ADDR", num_args = 1.., conflicts_with = "models")]
        gpus: Vec<PciAddress>,
        /// Every GPU of these models. [default, with neither: every passable GPU that is not
        /// the host's console]
        #[arg(long = "model", value_name = "VVVV:DDDD", num_args = 1..)]
        models: Vec<PciId>,
        /// The initramfs generator [default: debian unless only dracut's config exists].
        #[arg(long, value_enum)]
        initramfs: Option<gpupass::hostcfg::Initramfs>,
        /// Write the files.
        #[arg(long)]
        apply: bool,
    },
    /// Bind a device's whole IOMMU group (bridges excluded) to a driver, vfio-pci by default.
    ///
    /// Through driver_override + unbind + drivers_probe (never new_id, which grabs every
    /// identical device). Each device's original driver is recorded under the state dir so
    /// `gpupass restore` puts it back; if the kernel does not do it, gpupass undoes its writes.
    /// Refuses the host's console and groups holding a device the host uses, unless --force.
    #[command(
        after_help = "Examples:\n  gpupass bind 0000:03:00.0 --dry-run\n  gpupass bind 0000:03:00.0 --persist"
    )]
    Bind {
        /// Any device of the group (a GPU's address moves all its functions).
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// The driver.
        #[arg(long, default_value = "vfio-pci", value_parser = ["vfio-pci", "pci-stub"])]
        driver: String,
        /// Print the sysfs writes, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also write driverctl records so the override survives a reboot.
        #[arg(long)]
        persist: bool,
        /// Go ahead although the group holds the console or a device the host uses.
        #[arg(long)]
        force: bool,
    },
    /// Unbind a device's whole IOMMU group from its drivers (leaving it on none).
    Unbind {
        /// Any device of the group.
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// Print the sysfs writes, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go ahead although the group holds the console or a device the host uses.
        #[arg(long)]
        force: bool,
    },
    /// Put back the drivers a device's group had before `gpupass bind`/`unbind`.
    Restore {
        /// Any device of the group.
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// Print the sysfs writes, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Enable N SR-IOV virtual functions on a physical function (a GPU's, for its fractions),
    /// with sriov_drivers_autoprobe set to 0 first so no host driver takes them, and each new
    /// VF bound to vfio-pci (or the PF's own vfio-pci variant driver) through driver_override
    /// + drivers_probe, as `bind` does.
    ///
    /// --dry-run prints the exact sysfs writes, in order (the new VFs' addresses from
    /// sriov_offset/sriov_stride). What gpupass set is recorded in STATE_DIR/sriov.json;
    /// --undo puts back only that (the count and autoprobe it found), and only while the PF
    /// still shows what gpupass left. The kernel changes a non-zero count only through 0,
    /// destroying every VF: gpupass refuses that, and removing VFs it did not make, unless
    /// --force, and never when a domain holds one of them (asked of libvirt). A PF passed
    /// whole to a domain gets no VFs. If the kernel does not follow, gpupass puts the PF back.
    /// Nothing of this survives a reboot: run it again at boot.
    #[command(
        group(ArgGroup::new("what").required(true).args(["vfs", "undo"])),
        after_help = "Examples:\n  gpupass sriov 0000:4d:00.0 --vfs 4 --dry-run\n  gpupass sriov 0000:4d:00.0 --vfs 4\n  gpupass sriov 0000:4d:00.0 --undo"
    )]
    Sriov {
        /// The physical function (DDDD:BB:SS.F).
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// How many VFs the PF should have (0 removes them; at most sriov_totalvfs).
        #[arg(long, value_name = "N")]
        vfs: Option<u32>,
        /// Put back what gpupass changed on this PF (count and autoprobe as it found them).
        #[arg(long, conflicts_with_all = ["vfs", "driver"])]
        undo: bool,
        /// The new VFs' driver: vfio-pci, a vfio-pci variant (xe-vfio-pci, amd-vfio-pci), or
        /// none [default: the PF's variant `<driver>-vfio-pci` when loaded, else vfio-pci].
        #[arg(long, value_name = "DRIVER")]
        driver: Option<String>,
        /// Print the sysfs writes, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Change a count that is not 0 (the kernel destroys every VF first) or remove VFs
        /// gpupass did not make; never past a VF a domain holds.
        #[arg(long)]
        force: bool,
        /// Print JSON: {"pf","action","dry_run","before","after","driver","writes","vfs","record","warnings"}.
        #[arg(long)]
        json: bool,
    },
    /// Check the gpupass config file (unknown keys, aliases, rules, limits) and summarise it.
    #[command(
        after_help = "Example:\n  gpupass --config-file /etc/gpupass/gpupass.toml config check"
    )]
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Check GPUs' health from sysfs and quarantine those that fail: gone from the bus,
    /// all-ones reads, header type 0x7f, not in D0, no reset method, AER errors since the
    /// last check, a link narrower than its maximum.
    ///
    /// Default: every GPU but the host's console, and every quarantined address. The hook
    /// checks each GPU a domain gives back (`release end`), and the agent each one it sees
    /// released; this is the same check by hand. Exit 18 when a GPU fails.
    #[command(after_help = "Examples:
  gpupass health
  gpupass health 0000:18:00.0 --json")]
    Health {
        /// These GPUs (any function's address names its GPU).
        #[arg(value_name = "ADDR")]
        addresses: Vec<PciAddress>,
        /// Print JSON: {"gpus":[{"address","state","failed","problems","notes","reason","since"}]}.
        #[arg(long, conflicts_with = "recover")]
        json: bool,
        /// Try to bring the GPUs back: the kernel's reset, then remove + rescan of the GPU's
        /// functions, checking after each step (never a GPU a running domain holds).
        #[arg(long, requires = "addresses")]
        recover: bool,
    },
    /// List, add or clear quarantined GPUs: a quarantined GPU is never given to a domain.
    #[command(after_help = "Examples:
  gpupass quarantine list
  gpupass quarantine add 0000:18:00.0 --reason 'fans fail'
  gpupass quarantine clear 0000:18:00.0")]
    Quarantine {
        #[command(subcommand)]
        what: QuarantineCommand,
    },
    /// Print the <hostdev> blocks for every function of each GPU (for virsh attach-device or
    /// virsh edit).
    #[command(after_help = "Example:\n  gpupass xml 0000:01:00.0 > gpu.xml")]
    Xml {
        /// GPUs (any function's address names its GPU).
        #[arg(value_name = "ADDR", required = true)]
        addresses: Vec<PciAddress>,
    },
    /// Attach whole GPUs (or, with --vgpu vf, SR-IOV virtual functions) to a domain (running:
    /// live; defined: config; both when both).
    #[command(
        group(ArgGroup::new("what").required(true).multiple(true).args(["gpus", "count", "hgx_full", "vgpu"])),
        after_help = "Examples:\n  gpupass attach vm1 --gpu 0000:18:00.0\n  gpupass attach vm1 --count 2 --model 10de:2330 --config\n  gpupass attach vm1 --hgx-full --config\n  gpupass attach vm1 --vgpu vf --count 2 --config\n  gpupass attach vm1 --vgpu vf --gpu 0000:4d:00.1"
    )]
    Attach {
        /// The libvirt domain name.
        domain: String,
        /// These GPUs (repeatable).
        #[arg(long = "gpu", value_name = "ADDR", num_args = 1..)]
        gpus: Vec<PciAddress>,
        /// Any N free, passable GPUs (never the host's boot VGA), nearest the domain's NUMA
        /// pinning first.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256),
              conflicts_with = "gpus")]
        count: Option<u16>,
        /// Only GPUs of this vendor:device (with --count).
        #[arg(long, value_name = "VVVV:DDDD", requires = "count")]
        model: Option<PciId>,
        /// HGX full passthrough: every GPU of the host's NVSwitch fabric and every NVSwitch
        /// (NVIDIA class 0680), as one unit, or nothing (Fabric Manager runs in the guest).
        #[arg(long, conflicts_with_all = ["gpus", "count"])]
        hgx_full: bool,
        /// A fraction of a GPU instead of whole GPUs: `vf` = SR-IOV virtual functions (with
        /// --gpu VF, or --count N, 1 when neither), each on vfio-pci or a vfio-pci variant
        /// driver (`gpupass sriov PF --vfs N` makes them).
        #[arg(long, value_name = "PROFILE", value_parser = ["vf"], conflicts_with = "hgx_full")]
        vgpu: Option<String>,
        /// Leave the persistent definition as it is: no 64-bit window, phys-bits, root ports or
        /// slot layout for the GPUs (see `gpupass fit`).
        #[arg(long)]
        no_fit: bool,
        /// Attach live even when the running domain's 64-bit window cannot hold the GPUs.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: CommonFlags,
    },
    /// Run the host agent: live inventory from libvirt events, usage, limits, a local HTTP/JSON
    /// API and Prometheus metrics.
    ///
    /// Keeps who-holds-which-GPU current from libvirt's events and a periodic reconcile, writes
    /// the usage records the hook could not (live attach/detach, a missed event), and serves
    /// GET /v1/gpus, /v1/gpus/ADDR, /v1/domains, /v1/usage, /v1/limits, /v1/health, /metrics and
    /// POST /v1/domains/NAME/attach|detach on a unix socket. When libvirtd goes away it keeps
    /// answering with the last known state marked stale and reconnects. The CLI never needs it.
    #[command(
        after_help = "Examples:\n  gpupass serve\n  curl --unix-socket /run/gpupass/gpupass.sock http://gpupass/v1/gpus\n  curl --unix-socket /run/gpupass/gpupass.sock -H 'Content-Type: application/json' \\\n       -d '{\"count\":1}' http://gpupass/v1/domains/vm1/attach"
    )]
    Serve(ServeFlags),
    /// Check that a domain gives its GPUs what they need to work in the guest, and with --apply
    /// change its persistent definition so it does.
    ///
    /// Per GPU: the 64-bit window its BARs need (next power of two of their sum; the whole
    /// aperture is the next power of two of the windows). Per domain: the firmware's window
    /// (OVMF X-PciMmio64Mb), the guest's physical address bits, pcihole64, a pcie-root-port per
    /// GPU plus spares, each card's functions at one guest slot. Exit 0 when it fits, 16 when
    /// something is missing, 17 when it cannot fit on this host. --apply changes only those
    /// elements (byte for byte otherwise) and never lowers a value set higher.
    #[command(
        after_help = "Examples:\n  gpupass fit vm1\n  gpupass fit vm1 --count 8 --model 10de:2330 --json\n  gpupass fit vm1 --apply\n  gpupass fit --all"
    )]
    Fit {
        /// The libvirt domain name.
        #[arg(required_unless_present = "all")]
        domain: Option<String>,
        /// Every domain holding a GPU of this host, one line each (the GPUs that would not
        /// work, with the fix).
        #[arg(long, conflicts_with_all = ["domain", "gpus", "count", "apply"])]
        all: bool,
        /// Also these GPUs (as if attached).
        #[arg(long = "gpu", value_name = "ADDR", num_args = 1.., conflicts_with = "count")]
        gpus: Vec<PciAddress>,
        /// Also N free GPUs, chosen as `attach --count` would.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
        count: Option<u16>,
        /// Only GPUs of this vendor:device (with --count).
        #[arg(long, value_name = "VVVV:DDDD", requires = "count")]
        model: Option<PciId>,
        /// Change the persistent definition (validated by libvirt) so the GPUs fit.
        #[arg(long)]
        apply: bool,
        /// Print JSON: {"domain","plan":{need,provides,checks,changes,…},"applied","would_apply"}.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the host lock (0–3600).
        #[arg(long, value_name = "SECONDS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(0..=3600))]
        lock_timeout: u64,
        /// Seconds libvirt gets to connect, and then to complete the fit (1-3600).
        #[arg(long, value_name = "SECONDS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        libvirt_timeout: u64,
    },
    /// Detach whole GPUs (or, with --vgpu vf, SR-IOV virtual functions) from a domain.
    #[command(
        group(ArgGroup::new("what").required(true).args(["gpus", "all"])),
        after_help = "Examples:\n  gpupass detach vm1 --gpu 0000:18:00.0\n  gpupass detach vm1 --all --config\n  gpupass detach vm1 --vgpu vf --all --config"
    )]
    Detach {
        /// The libvirt domain name.
        domain: String,
        /// These GPUs (repeatable).
        #[arg(long = "gpu", value_name = "ADDR", num_args = 1..)]
        gpus: Vec<PciAddress>,
        /// Every GPU of this host that the domain has (with --vgpu vf: every VF).
        #[arg(long)]
        all: bool,
        /// `vf`: remove SR-IOV virtual functions (--gpu VF, or --all of them) instead of GPUs.
        #[arg(long, value_name = "PROFILE", value_parser = ["vf"])]
        vgpu: Option<String>,
        /// Seconds to wait for the guest to release a device on a live detach (1–3600).
        #[arg(long, value_name = "SECONDS", default_value_t = 15,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        #[command(flatten)]
        common: CommonFlags,
    },
}

/// `gpupass serve` flags; each wins over the config file's `[serve]`.
#[derive(Debug, clap::Args)]
struct ServeFlags {
    /// The API's unix socket (mode 0660) [default: serve.socket, else /run/gpupass/gpupass.sock].
    #[arg(long, env = "GPUPASS_SOCKET", value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// Group allowed to use the socket [default: serve.socket_group, else root's].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Also serve on this loopback TCP address, e.g. 127.0.0.1:7070 (needs --token-file).
    #[arg(long, value_name = "IP:PORT")]
    tcp: Option<std::net::SocketAddr>,
    /// File with the bearer token TCP clients must send (mode 0600 or stricter).
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Seconds between full reconciles with libvirt (1–86400) [default: serve.reconcile_seconds,
    /// else 60].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    reconcile_seconds: Option<u64>,
    /// Seconds an API attach/detach waits for the host lock (0–3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    lock_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// The quarantined GPUs: address, since, who, reason.
    List {
        /// Print JSON: {"quarantined":[{"address","reason","since","by"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Quarantine a GPU by hand.
    Add {
        /// The GPU (any of its functions).
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// Why: shown wherever the GPU is refused.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        reason: String,
    },
    /// Lift a quarantine after checking the GPU again; refused while it still fails.
    Clear {
        /// The GPU.
        #[arg(value_name = "ADDR")]
        address: PciAddress,
        /// Clear it although it still fails its check (logged).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config; exit 2 with the first problem when it is invalid.
    Check,
}

#[derive(Debug, clap::Args)]
struct CommonFlags {
    /// Change the running domain only (with --config: both).
    #[arg(long)]
    live: bool,
    /// Change the persistent definition only (with --live: both).
    #[arg(long)]
    config: bool,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the host lock (0–3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    lock_timeout: u64,
    /// Seconds libvirt gets to connect, and then to complete the change under the host lock;
    /// past that gpupass stops with exit 8, which releases the lock (1-3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    libvirt_timeout: u64,
}

fn run(g: &Global, command: LibvirtCommand) -> anyhow::Result<()> {
    let flags = |c: &CommonFlags, detach_timeout: u64| AssignFlags {
        live: c.live,
        config: c.config,
        json: c.json,
        lock_timeout: Duration::from_secs(c.lock_timeout),
        detach_timeout: Duration::from_secs(detach_timeout),
        libvirt_timeout: Duration::from_secs(c.libvirt_timeout),
        fit: true,
        force: false,
    };
    match command {
        LibvirtCommand::Serve(f) => cli::serve::serve(
            g,
            cli::serve::ServeFlags {
                socket: f.socket,
                socket_group: f.socket_group,
                tcp: f.tcp,
                token_file: f.token_file,
                reconcile_seconds: f.reconcile_seconds,
                lock_timeout: Duration::from_secs(f.lock_timeout),
            },
        ),
        LibvirtCommand::List { json, no_libvirt } => cli::list::list(g, json, no_libvirt),
        LibvirtCommand::Show {
            address,
            json,
            no_libvirt,
        } => cli::list::show(g, address, json, no_libvirt),
        LibvirtCommand::Xml { addresses } => cli::xml::xml(g, &addresses),
        LibvirtCommand::Health {
            addresses,
            json,
            recover: false,
        } => cli::health::health(g, &addresses, json),
        LibvirtCommand::Health { addresses, .. } => cli::health::recover(g, &addresses),
        LibvirtCommand::Quarantine { what } => match what {
            QuarantineCommand::List { json } => cli::health::list(g, json),
            QuarantineCommand::Add { address, reason } => cli::health::add(g, address, &reason),
            QuarantineCommand::Clear { address, force } => cli::health::clear(g, address, force),
        },
        LibvirtCommand::Config {
            what: ConfigCommand::Check,
        } => {
            let path = g
                .config
                .clone()
                .unwrap_or_else(|| gpupass::config::DEFAULT_CONFIG.into());
            let c = &g.settings;
            g.template()?;
            let what = if path.exists() {
                format!("{}: ok", path.display())
            } else {
                format!("no config at {}: built-in defaults", path.display())
            };
            cli::print_all(&format!(
                "{what} ({} aliases, {} rules, {} owner limits, template {})\n",
                c.aliases.len(),
                c.rules.len(),
                c.limits.len(),
                c.templates_dir
                    .as_ref()
                    .map_or("built in".to_owned(), |d| d.display().to_string())
            ))
        }
        LibvirtCommand::Bind {
            address,
            driver,
            dry_run,
            persist,
            force,
        } => cli::bind::bind(
            g,
            address,
            Some(driver),
            cli::bind::BindFlags {
                dry_run,
                persist,
                force,
            },
        ),
        LibvirtCommand::Unbind {
            address,
            dry_run,
            force,
        } => cli::bind::bind(
            g,
            address,
            None,
            cli::bind::BindFlags {
                dry_run,
                persist: false,
                force,
            },
        ),
        LibvirtCommand::Restore { address, dry_run } => cli::bind::restore(g, address, dry_run),
        LibvirtCommand::Sriov {
            address,
            vfs,
            undo,
            driver,
            dry_run,
            force,
            json,
        } => cli::sriov::sriov(
            g,
            address,
            &cli::sriov::SriovFlags {
                vfs: if undo { None } else { vfs },
                driver,
                dry_run,
                force,
                json,
            },
        ),
        LibvirtCommand::HostConfig {
            gpus,
            models,
            initramfs,
            apply,
        } => cli::host_config::host_config(g, &gpus, &models, initramfs, apply),
        LibvirtCommand::Doctor {
            gpus,
            json,
            no_libvirt,
        } => cli::doctor::doctor(g, &gpus, json, no_libvirt),
        LibvirtCommand::Attach {
            domain,
            gpus,
            count,
            model,
            hgx_full,
            vgpu,
            no_fit,
            force,
            common,
        } => {
            let request = match count {
                _ if hgx_full => AttachRequest::HgxFull,
                // `vf` is the one profile clap accepts.
                None if vgpu.is_some() && !gpus.is_empty() => AttachRequest::Vfs(gpus),
                n if vgpu.is_some() => AttachRequest::VfCount {
                    count: n.map_or(1, usize::from),
                    model,
                },
                Some(n) => AttachRequest::Count {
                    count: usize::from(n),
                    model,
                },
                None => AttachRequest::Gpus(gpus),
            };
            cli::assign::run(
                g,
                &domain,
                cli::assign::Action::Attach(&request),
                &AssignFlags {
                    fit: !no_fit,
                    force,
                    ..flags(&common, 0)
                },
            )
        }
        LibvirtCommand::Fit {
            domain,
            all,
            gpus,
            count,
            model,
            apply,
            json,
            lock_timeout,
            libvirt_timeout,
        } => {
            let request = match count {
                Some(n) => Some(AttachRequest::Count {
                    count: usize::from(n),
                    model,
                }),
                None if !gpus.is_empty() => Some(AttachRequest::Gpus(gpus)),
                None => None,
            };
            let flags = cli::fit::FitFlags {
                json,
                apply,
                lock_timeout: Duration::from_secs(lock_timeout),
                libvirt_timeout: Duration::from_secs(libvirt_timeout),
            };
            match domain {
                Some(d) if !all => cli::fit::fit(g, &d, request.as_ref(), &flags),
                _ => cli::fit::fit_all(g, &flags),
            }
        }
        LibvirtCommand::Detach {
            domain,
            gpus,
            all,
            vgpu,
            timeout,
            common,
        } => {
            let request = match (all, vgpu.is_some()) {
                (true, false) => DetachRequest::All,
                (false, false) => DetachRequest::Gpus(gpus),
                (true, true) => DetachRequest::AllVfs,
                (false, true) => DetachRequest::Vfs(gpus),
            };
            cli::assign::run(
                g,
                &domain,
                cli::assign::Action::Detach(&request),
                &flags(&common, timeout),
            )
        }
    }
}

/// The documented exit code for an error (see EXIT_CODES).
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<AssignError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<AllocError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<LibvirtError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<HealthError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<gpupass::fit::FitError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<gpupass::refit::RefitError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<SriovError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<BindError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<HostConfigError>() {
            return match e {
                HostConfigError::NothingSelected(_) => 3,
                _ => 1,
            };
        }
        if cause.downcast_ref::<ChecksFailed>().is_some() {
            return 13;
        }
        if let Some(e) = cause.downcast_ref::<LockError>() {
            return if matches!(e, LockError::Timeout { .. }) {
                12
            } else {
                1
            };
        }
        if cause.downcast_ref::<ModelError>().is_some()
            || cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<XmlError>().is_some()
        {
            return 2;
        }
        if cause.downcast_ref::<SysfsError>().is_some() {
            return 1;
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = match gpupass::hook::cli::parse_args::<Cli>("gpupass", |c| &mut c.dirs) {
        Ok(c) => c,
        Err(code) => return code,
    };
    gpupass::observability::init(cli.verbose, cli.dirs.log_file.as_deref());
    let command = match cli.command {
        Command::HookMode(cmd) => return gpupass::hook::cli::run(&cli.dirs, &cmd),
        Command::Libvirt(c) => c,
    };
    // Every libvirt-side command reads the config once, here.
    let settings = match cli.dirs.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "gpupass: error: {}",
                one_line(&gpupass::hook::cli::error_chain(&e))
            );
            return ExitCode::from(2);
        }
    };
    let g = Global {
        host_root: cli.dirs.host_root,
        uri: cli.connect,
        run_dir: cli.dirs.run_dir,
        state_dir: cli.dirs.state_dir,
        config: cli.dirs.config_file,
        settings,
    };
    match run(&g, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpupass: error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}
