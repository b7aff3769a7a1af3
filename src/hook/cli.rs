//! The command line of hook mode, shared by `gpupass` and the lean `gpupass-hook` binary (same
//! code, no libvirt linked): `transform`, `hook qemu …`, `usage`, `install-hook`,
//! `cloudstack …`. This is an entry point: it reads stdin, prints to stdout/stderr, and returns
//! the exit code.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::alloc::lease::LeaseStore;
use crate::alloc::plan::AttachRequest;
use crate::config::{ConfigError, GpupassConfig};
use crate::fsutil;
use crate::hook::args::HookOp;
use crate::hook::run::{self, HookEnv};
use crate::hook::{decisions, install, HookError};
use crate::model::{PciAddress, PciId};
use crate::usage::{parse_since, summarize, unix_now, Ledger};
use crate::xml::compose::HostdevTemplate;
use crate::xml::rewrite::MAX_XML_BYTES;

/// Directories every command uses, the same way.
#[derive(Debug, Clone, clap::Args)]
pub struct Dirs {
    /// Read host state (sysfs, procfs, libvirt's domain files) under DIR instead of /.
    #[arg(
        long,
        env = "GPUPASS_HOST_ROOT",
        default_value = "/",
        global = true,
        value_name = "DIR"
    )]
    pub host_root: PathBuf,
    /// Directory for the host lock and leases.
    #[arg(
        long,
        env = "GPUPASS_RUN_DIR",
        default_value = "/run/gpupass",
        global = true,
        value_name = "DIR"
    )]
    pub run_dir: PathBuf,
    /// Directory for the usage ledger.
    #[arg(
        long,
        env = "GPUPASS_STATE_DIR",
        default_value = "/var/lib/gpupass",
        global = true,
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
    /// gpupass config file [default: /etc/gpupass/gpupass.toml when it exists].
    #[arg(
        long = "config-file",
        env = "GPUPASS_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config_file: Option<PathBuf>,
    /// Append log lines to FILE instead of stderr (for the hook: libvirt drops a successful
    /// hook's stderr). Errors still go to stderr.
    #[arg(long, env = "GPUPASS_LOG_FILE", global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// The config file as [`Dirs::resolve`] loaded it.
    #[arg(skip)]
    pub loaded: Option<GpupassConfig>,
}

impl Dirs {
    /// Takes the directories left at their built-in defaults from the config file's `[paths]`
    /// (flags and environment variables win), keeping the loaded file for [`Dirs::config`].
    /// Reads nothing when every directory was given (the installed hook passes them all): hook
    /// mode's bookkeeping calls (`started`, `release`, …) must work without a valid config, and
    /// every other command calls [`Dirs::config`] before anything else.
    pub fn resolve(&mut self, defaulted: Defaulted) -> Result<(), ConfigError> {
        if !(defaulted.host_root || defaulted.run_dir || defaulted.state_dir) {
            return Ok(());
        }
        let config = GpupassConfig::load(self.config_file.as_deref())?;
        let pick = |defaulted: bool, from: &Option<PathBuf>, to: &mut PathBuf| {
            if let (true, Some(p)) = (defaulted, from) {
                to.clone_from(p);
            }
        };
        pick(
            defaulted.host_root,
            &config.paths.host_root,
            &mut self.host_root,
        );
        pick(defaulted.run_dir, &config.paths.run_dir, &mut self.run_dir);
        pick(
            defaulted.state_dir,
            &config.paths.state_dir,
            &mut self.state_dir,
        );
        self.loaded = Some(config);
        Ok(())
    }

    /// The config file: the one [`Dirs::resolve`] loaded, else loaded now.
    pub fn config(&self) -> Result<GpupassConfig, ConfigError> {
        match &self.loaded {
            Some(c) => Ok(c.clone()),
            None => GpupassConfig::load(self.config_file.as_deref()),
        }
    }
}

/// Which of [`Dirs`]' directories were left at their built-in defaults (neither a flag nor an
/// environment variable gave them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defaulted {
    /// `--host-root`.
    pub host_root: bool,
    /// `--run-dir`.
    pub run_dir: bool,
    /// `--state-dir`.
    pub state_dir: bool,
}

impl Defaulted {
    /// Read from the parsed command line (before its values are taken out of it).
    pub fn of(matches: &clap::ArgMatches) -> Self {
        use clap::parser::ValueSource;
        let d = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        Self {
            host_root: d("host_root"),
            run_dir: d("run_dir"),
            state_dir: d("state_dir"),
        }
    }
}

/// Parses a binary's command line the way both binaries do: a parse error or `--help` as
/// [`exit_on_parse_error`] handles it, then the config's `[paths]` applied ([`Dirs::resolve`];
/// an unreadable or invalid config is one line and exit 2).
pub fn parse_args<C>(program: &str, dirs: fn(&mut C) -> &mut Dirs) -> Result<C, ExitCode>
where
    C: clap::CommandFactory + clap::FromArgMatches,
{
    // The values are moved out of the matches (`from_arg_matches` would copy them all), after
    // noting which directories were defaulted.
    let parsed = C::command().try_get_matches().and_then(|mut m| {
        let defaulted = Defaulted::of(&m);
        C::from_arg_matches_mut(&mut m).map(|c| (c, defaulted))
    });
    let (mut cli, defaulted) = parsed.map_err(|e| exit_on_parse_error(&e, program))?;
    if let Err(e) = dirs(&mut cli).resolve(defaulted) {
        eprintln!("gpupass: error: {}", one_line(&error_chain(&e)));
        return Err(ExitCode::from(2));
    }
    Ok(cli)
}

/// An error with its sources, `: `-joined (what anyhow's `{:#}` prints).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `transform` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TransformArgs {
    /// These GPUs instead of the domain's own request (repeatable).
    #[arg(long = "gpu", value_name = "ADDR", num_args = 1.., conflicts_with = "count")]
    pub gpus: Vec<PciAddress>,
    /// Any N GPUs instead of the domain's own request.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub count: Option<u16>,
    /// Only this vendor:device (with --count).
    #[arg(long, value_name = "VVVV:DDDD", requires = "count")]
    pub model: Option<PciId>,
    /// Seconds a chosen GPU stays reserved for this domain before it starts (1–86400).
    #[arg(long, value_name = "SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=crate::alloc::lease::MAX_LEASE_SECONDS))]
    pub lease_seconds: u64,
    /// Leave the domain's 64-bit window, phys-bits, root ports and slot layout as they are
    /// (by default the output is fitted to its GPUs, like `gpupass fit --apply`).
    #[arg(long)]
    pub no_fit: bool,
}

/// `hook` arguments, as libvirt passes them after the shim adds `hook qemu`.
#[derive(Debug, Clone, clap::Args)]
pub struct HookArgs {
    /// The hook driver: `qemu`.
    #[arg(value_parser = ["qemu"])]
    pub driver: String,
    /// The domain name.
    pub domain: String,
    /// The operation (prepare, start, started, stopped, release, migrate, restore, …).
    pub op: String,
    /// The sub-operation (begin, end).
    pub subop: String,
    /// Extra argument (`-`).
    #[arg(default_value = "-")]
    pub extra: String,
}

/// The hook-mode subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HookCommand {
    /// Read a domain XML on stdin, add the GPUs it asks for, print it on stdout.
    ///
    /// The request comes from the flags, else the domain's <metadata><gpupass:gpus …/>, else the
    /// first config rule matching its name. A domain with no request, or whose request is met,
    /// comes out unchanged. On any failure: nothing on stdout, one line on stderr, non-zero exit.
    #[command(
        after_help = "Examples:\n  gpupass transform < vm.xml > vm-with-gpus.xml\n  gpupass transform --count 1 --model 10de:11b4 < vm.xml"
    )]
    Transform(TransformArgs),
    /// The libvirt qemu hook: DRIVER DOMAIN OP SUBOP [EXTRA], domain XML on stdin.
    ///
    /// prepare begin: blocks a start that cannot work (exit 1, one line on stderr);
    /// migrate/restore begin: rewrites GPU addresses to free local GPUs (prints XML, or nothing
    /// when unchanged); started/reconnect begin and release end: usage records. Never calls
    /// libvirt.
    Hook(HookArgs),
    /// GPU-seconds per domain and per GPU, from the hook's ledger.
    Usage {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only usage after this: unix seconds, or an age like 90m, 24h, 7d.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
    },
    /// CloudStack 4.21+ KVM agent: its GPU discovery, and installing gpupass for it.
    #[command(subcommand)]
    Cloudstack(crate::cloudstack::cli::CloudstackCommand),
    /// Install the qemu hook shim into ROOT/etc/libvirt/hooks/qemu.d/gpupass.
    #[command(after_help = "Example:\n  gpupass install-hook && kill -HUP $(pidof libvirtd)")]
    InstallHook {
        /// Install under this root instead of /.
        #[arg(long, default_value = "/", value_name = "DIR")]
        root: PathBuf,
        /// The hook binary the shim runs [default: gpupass-hook next to this program].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Remove the shim instead.
        #[arg(long)]
        uninstall: bool,
    },
}

/// The domain XML on stdin, at most [`MAX_XML_BYTES`], UTF-8.
pub fn read_stdin() -> Result<String, HookError> {
    let mut buf = Vec::new();
    io::stdin()
        .lock()
        .take(MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(HookError::Stdin)?;
    if buf.len() > MAX_XML_BYTES {
        return Err(HookError::TooLarge);
    }
    String::from_utf8(buf).map_err(|_| HookError::NotUtf8)
}

/// Joins whitespace runs into single spaces: no newline from libvirt, QEMU or an error chain ever
/// splits a message.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error with its sources on one line.
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    one_line(&msg)
}

/// Writes `text` to stdout, flushed.
pub fn print_stdout(text: &str) -> Result<(), HookError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(HookError::Stdin)
}

/// How long the hook and `transform` wait for the host lock.
const HOOK_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment of one hook-mode call. The run and state dirs must be trusted
/// ([`fsutil::private_dir`]: the running user's, writable by nobody else). `bookkeeping` calls
/// (started, release) need no config: one that cannot be loaded is a warning, and the session
/// is recorded without an owner from the config's rules.
fn env(dirs: &Dirs, lease: Duration, bookkeeping: bool) -> Result<HookEnv, HookError> {
    if bookkeeping {
        let config = dirs.config().unwrap_or_else(|e| {
            tracing::warn!("{}; recording usage without it", error_line(&e));
            GpupassConfig::default()
        });
        env_with(dirs, lease, config, false)
    } else {
        env_with(dirs, lease, dirs.config()?, true)
    }
}

/// [`env`] with the config already loaded (once per call: a transform checks it first);
/// `templates`: the config's template directory is loaded (else the built-in template).
fn env_with(
    dirs: &Dirs,
    lease: Duration,
    config: GpupassConfig,
    templates: bool,
) -> Result<HookEnv, HookError> {
    fsutil::private_dir(&dirs.run_dir)?;
    fsutil::private_dir(&dirs.state_dir)?;
    fsutil::check_dir_if_exists(LeaseStore::new(&dirs.run_dir).dir())?;
    let template = match (&config.templates_dir, templates) {
        (Some(d), true) => HostdevTemplate::from_dir(d)?,
        _ => HostdevTemplate::builtin(),
    };
    Ok(HookEnv {
        host_root: dirs.host_root.clone(),
        run_dir: dirs.run_dir.clone(),
        state_dir: dirs.state_dir.clone(),
        config,
        template,
        lease_ttl: lease,
        lock_timeout: HOOK_LOCK_TIMEOUT,
    })
}

fn transform(dirs: &Dirs, config: GpupassConfig, a: &TransformArgs) -> Result<(), HookError> {
    let input = read_stdin()?;
    let e = env_with(dirs, Duration::from_secs(a.lease_seconds), config, true)?;
    let request = match (a.count, a.gpus.is_empty()) {
        (Some(n), _) => Some(AttachRequest::Count {
            count: usize::from(n),
            model: a.model,
        }),
        (None, false) => Some(AttachRequest::Gpus(a.gpus.clone())),
        (None, true) => None,
    };
    let out = run::transform_and_fit(&e, &input, request, !a.no_fit)?;
    print_stdout(out.as_deref().unwrap_or(&input))
}

/// Counts a decision for `/metrics`; a failure is a warning (an untrusted run dir only a debug
/// line: the command's own error already names it) and never changes the decision.
fn count_decision(dirs: &Dirs, op: &str, outcome: &str) {
    match decisions::record(&dirs.run_dir, op, outcome) {
        Ok(()) => {}
        Err(e @ fsutil::FsError::Untrusted { .. }) => {
            tracing::debug!("{op} decision not counted: {}", error_line(&e));
        }
        Err(e) => tracing::warn!("{op} decision not counted: {}", error_line(&e)),
    }
}

/// Runs one hook call; returns the exit code libvirt sees.
fn hook(dirs: &Dirs, a: &HookArgs) -> ExitCode {
    let op = HookOp::parse(&a.op, &a.subop);
    let needs_xml = !matches!(op, HookOp::Other(_) | HookOp::Start | HookOp::Stopped);
    if !needs_xml {
        return ExitCode::SUCCESS;
    }
    let result = std::panic::catch_unwind(|| -> Result<Option<String>, HookError> {
        let input = read_stdin()?;
        let bookkeeping = matches!(op, HookOp::Started | HookOp::Reconnect | HookOp::Release);
        let e = env(dirs, Duration::from_secs(600), bookkeeping)?;
        match op {
            HookOp::Prepare => {
                for w in run::prepare(&e, &input)? {
                    eprintln!("gpupass: warning: {w}");
                }
                Ok(None)
            }
            HookOp::Migrate | HookOp::Restore => run::transform(&e, &input, None),
            HookOp::Started | HookOp::Reconnect => run::started(&e, &input).map(|()| None),
            HookOp::Release => run::release(&e, &input).map(|()| None),
            HookOp::Start | HookOp::Stopped | HookOp::Other(_) => Ok(None),
        }
    });
    // Only prepare (blocks a start that cannot work) and migrate/restore (a rewrite that cannot
    // be done) fail; bookkeeping failures are logged and never stop a domain.
    let fails = matches!(op, HookOp::Prepare | HookOp::Migrate | HookOp::Restore);
    let what = format!("hook {} {} {}", a.op, a.subop, a.domain);
    match &result {
        Ok(Ok(Some(_))) => tracing::info!("{what}: rewrote the domain XML"),
        Ok(Ok(None)) => tracing::info!("{what}: ok, unchanged"),
        Ok(Err(e)) => tracing::info!("{what}: refused: {}", error_line(e)),
        Err(_) => tracing::error!("{what}: panic"),
    }
    if fails {
        let outcome = match (&result, op) {
            (Ok(Ok(_)), HookOp::Prepare) => "allowed",
            (Ok(Err(_)) | Err(_), HookOp::Prepare) => "blocked",
            (Ok(Ok(Some(_))), _) => "rewritten",
            (Ok(Ok(None)), _) => "unchanged",
            (Ok(Err(_)) | Err(_), _) => "failed",
        };
        count_decision(dirs, &a.op, outcome);
    }
    match result {
        Ok(Ok(Some(xml))) => match print_stdout(&xml) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gpupass: {}", error_line(&e));
                ExitCode::from(1)
            }
        },
        Ok(Ok(None)) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("gpupass: {} {}: {}", a.op, a.domain, error_line(&e));
            if fails {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(_) => {
            eprintln!("gpupass: {} {}: internal error (panic)", a.op, a.domain);
            if fails {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn usage(dirs: &Dirs, json: bool, since: Option<&str>) -> Result<(), HookError> {
    let now = unix_now();
    let since = match since {
        Some(s) => parse_since(s, now).ok_or_else(|| {
            HookError::Request(crate::request::RequestError::Invalid(format!(
                "--since '{s}': give unix seconds or an age like 90m, 24h, 7d"
            )))
        })?,
        None => 0,
    };
    let report = summarize(&Ledger::new(&dirs.state_dir).read()?, since, now);
    if json {
        let mut s = serde_json::to_string_pretty(&report).expect("usage serializes");
        s.push('\n');
        return print_stdout(&s);
    }
    let mut out =
        String::from("DOMAIN                            GPU-SECONDS  GPU-HOURS  RUNNING\n");
    for d in &report.domains {
        out.push_str(&format!(
            "{:<32}  {:>11}  {:>9.2}  {}\n",
            d.domain,
            d.gpu_seconds,
            d.gpu_seconds as f64 / 3600.0,
            if d.running { "yes" } else { "no" }
        ));
    }
    out.push_str(&format!(
        "total                                               {:>11}  {:>9.2}\n",
        report.total_gpu_seconds,
        report.total_gpu_seconds as f64 / 3600.0
    ));
    // Skipped ledger lines were logged (with their numbers) as the ledger was read.
    print_stdout(&out)
}

/// The hook binary installed shims run: `binary`, else `gpupass-hook` next to this program
/// (else this program).
pub fn hook_binary(binary: Option<&std::path::Path>) -> Result<PathBuf, HookError> {
    if let Some(b) = binary {
        return Ok(b.to_path_buf());
    }
    let me = std::env::current_exe().map_err(HookError::Stdin)?;
    let lean = me.with_file_name("gpupass-hook");
    Ok(if lean.is_file() { lean } else { me })
}

/// The directory flags installed shims pass, so the hook sees what this command saw.
pub fn shim_args(dirs: &Dirs) -> Vec<String> {
    let mut args = vec![
        "--host-root".to_string(),
        dirs.host_root.display().to_string(),
        "--run-dir".to_string(),
        dirs.run_dir.display().to_string(),
        "--state-dir".to_string(),
        dirs.state_dir.display().to_string(),
    ];
    if let Some(c) = &dirs.config_file {
        args.push("--config-file".into());
        args.push(c.display().to_string());
    }
    if let Some(l) = &dirs.log_file {
        args.push("--log-file".into());
        args.push(l.display().to_string());
        args.push("-v".into());
    }
    args
}

/// The line saying how the running libvirtd learns of a changed hook.
pub fn reload_line(reload_pid: Option<u32>) -> String {
    match reload_pid {
        Some(pid) => format!(
            "libvirtd is running (pid {pid}) and reads its hooks only at start: reload it with `kill -HUP {pid}`\n"
        ),
        None => "libvirtd will use it from its next start (or send it SIGHUP)\n".to_string(),
    }
}

fn install_hook(
    dirs: &Dirs,
    root: &std::path::Path,
    binary: Option<&std::path::Path>,
    remove: bool,
) -> Result<(), HookError> {
    let done = if remove {
        install::uninstall(root)?
    } else {
        install::install(root, &hook_binary(binary)?, &shim_args(dirs))?
    };
    let verb = if remove { "removed" } else { "installed" };
    let mut msg = format!("{verb} {}\n", done.path.display());
    msg.push_str(&reload_line(done.reload_pid));
    print_stdout(&msg)
}

/// Handles a command-line parse error the way both binaries do: help and version are printed
/// as clap prints them (exit 0); anything else becomes one line on stderr and exit 2 (clap's
/// usage block and hint after the first paragraph would make it several lines).
pub fn exit_on_parse_error(e: &clap::Error, program: &str) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let first: Vec<&str> = rendered
        .trim_start()
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let text = one_line(&first.join(" "));
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    eprintln!("gpupass: error: {text} (see {program} --help)");
    ExitCode::from(2)
}

/// Runs a hook-mode command and returns its exit code; errors are one line on stderr.
pub fn run(dirs: &Dirs, cmd: &HookCommand) -> ExitCode {
    // Every command but the hook stops on a config it cannot load (exit 2), even one that does
    // not use it, before doing anything.
    let config_ok = || dirs.config().map(drop).map_err(HookError::from);
    let result = match cmd {
        HookCommand::Hook(a) => return hook(dirs, a),
        HookCommand::Cloudstack(c) => {
            return match config_ok() {
                Ok(()) => crate::cloudstack::cli::run(dirs, c),
                Err(e) => {
                    eprintln!("gpupass: error: {}", error_line(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        HookCommand::Transform(a) => {
            let r = dirs
                .config()
                .map_err(HookError::from)
                .and_then(|c| transform(dirs, c, a));
            let outcome = if r.is_ok() { "ok" } else { "refused" };
            count_decision(dirs, "transform", outcome);
            r
        }
        HookCommand::Usage { json, since } => {
            config_ok().and_then(|()| usage(dirs, *json, since.as_deref()))
        }
        HookCommand::InstallHook {
            root,
            binary,
            uninstall,
        } => config_ok().and_then(|()| install_hook(dirs, root, binary.as_deref(), *uninstall)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpupass: error: {}", error_line(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_unix_seconds_or_an_age() {
        assert_eq!(parse_since("1700000000", 5), Some(1_700_000_000));
        assert_eq!(parse_since("90m", 10_000), Some(10_000 - 5400));
        assert_eq!(parse_since("7d", 1_000_000), Some(1_000_000 - 604_800));
        assert_eq!(parse_since("2w", 10), None);
        assert_eq!(parse_since("", 10), None);
        assert_eq!(parse_since("h", 10), None);
    }
}
