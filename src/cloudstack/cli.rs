//! `gpupass cloudstack …` (in both binaries): `discover`, what the CloudStack agent runs every
//! minute, and `install`. An entry point: prints to stdout/stderr and returns the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cloudstack::agent::{self, AgentHooks};
use crate::cloudstack::{cache, discover, install};
use crate::hook::cli::{error_line, hook_binary, print_stdout, reload_line, shim_args, Dirs};
use crate::hook::{install as hook_install, HookError};

/// `cloudstack` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CloudstackCommand {
    /// Print the GPU list the CloudStack KVM agent parses (what its gpudiscovery.sh prints).
    ///
    /// One entry per passable GPU (display classes and processing accelerators), never the
    /// host's boot VGA; GPUs left out are named on stderr with the reason. When the host cannot
    /// be read, the last good answer (kept in the run dir) is printed instead, exit 0, with a
    /// note on stderr: the agent never sees an empty or partial list.
    #[command(after_help = "Example:\n  gpupass cloudstack discover | jq '.gpus[].pci_address'")]
    Discover,
    /// Install gpupass for the CloudStack agent: the discovery shim at its gpudiscovery.sh (the
    /// original kept as gpudiscovery.sh.gpupass-orig), the shell XML transformer in its hook
    /// directory and the libvirt qemu hook; prints the agent.properties lines to add.
    #[command(
        after_help = "Example:\n  gpupass cloudstack install && systemctl restart cloudstack-agent"
    )]
    Install {
        /// Install under this root instead of /.
        #[arg(long, default_value = "/", value_name = "DIR")]
        root: PathBuf,
        /// The hook binary the shims run [default: gpupass-hook next to this program].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Remove them instead, putting the agent's own gpudiscovery.sh back.
        #[arg(long)]
        uninstall: bool,
    },
}

/// Runs a `cloudstack` command; returns the exit code.
pub fn run(dirs: &Dirs, cmd: &CloudstackCommand) -> ExitCode {
    let result = match cmd {
        CloudstackCommand::Discover => return discover(dirs),
        CloudstackCommand::Install {
            root,
            binary,
            uninstall,
        } => install_all(dirs, root, binary.as_deref(), *uninstall),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpupass: error: {}", error_line(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// `discover`: the answer, else the last good one, else one line and exit 1.
fn discover(dirs: &Dirs) -> ExitCode {
    let opts = match dirs.config() {
        Ok(c) => c.cloudstack,
        Err(e) => {
            eprintln!("gpupass: error: {}", error_line(&e));
            return ExitCode::from(2);
        }
    };
    let fresh = discover::gather(&dirs.host_root, &dirs.state_dir, &dirs.run_dir, &opts).map(|d| {
        let mut json = serde_json::to_string(&d.list).expect("the answer serializes");
        json.push('\n');
        (json, d.left_out)
    });
    let json = match fresh {
        Ok((json, left_out)) => {
            for line in left_out {
                eprintln!("gpupass: {line}");
            }
            if let Err(e) = cache::save(&dirs.run_dir, &json) {
                eprintln!(
                    "gpupass: warning: the answer is not kept for a transient failure: {}",
                    error_line(&e)
                );
            }
            json
        }
        Err(e) => match cache::load(&dirs.run_dir) {
            Ok(Some(json)) => {
                eprintln!(
                    "gpupass: warning: discovery failed ({}); printing the last good answer from {}",
                    error_line(&e),
                    cache::path(&dirs.run_dir).display()
                );
                json
            }
            Ok(None) => {
                eprintln!(
                    "gpupass: error: discovery failed and there is no last good answer: {}",
                    error_line(&e)
                );
                return ExitCode::from(1);
            }
            Err(c) => {
                eprintln!(
                    "gpupass: error: discovery failed ({}) and the last good answer cannot be used: {}",
                    error_line(&e),
                    error_line(&c)
                );
                return ExitCode::from(1);
            }
        },
    };
    match print_stdout(&json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpupass: error: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// `install` / `install --uninstall`: the agent's files and the qemu hook.
fn install_all(
    dirs: &Dirs,
    root: &std::path::Path,
    binary: Option<&std::path::Path>,
    remove: bool,
) -> Result<(), HookError> {
    let hooks = match agent::read(root) {
        Ok(Some(f)) => f.hooks,
        Ok(None) => AgentHooks::from_properties(&Default::default()),
        Err(source) => {
            return Err(HookError::Install {
                path: root.join(agent::AGENT_PROPERTIES),
                source,
            })
        }
    };
    let mut msg = String::new();
    if remove {
        let done = install::uninstall(root, &hooks)?;
        let hook = hook_install::uninstall(root)?;
        for l in done.lines {
            msg.push_str(&format!("{l}\n"));
        }
        msg.push_str(&format!("removed {}\n", hook.path.display()));
        msg.push_str(&reload_line(hook.reload_pid));
        msg.push_str("remove the agent.hooks.libvirt_vm_xml_transformer.* lines from agent.properties and restart the agent\n");
        return print_stdout(&msg);
    }
    install::check_host(root)?;
    let binary = hook_binary(binary)?;
    let args = shim_args(dirs);
    // The qemu hook first: it is what blocks a start that cannot work, so a transformer never
    // goes in without it.
    let hook = hook_install::install(root, &binary, &args)?;
    let done = install::install(root, &hooks, &binary, &args)?;
    for l in done.lines {
        msg.push_str(&format!("{l}\n"));
    }
    msg.push_str(&format!("installed {}\n", hook.path.display()));
    msg.push_str(&reload_line(hook.reload_pid));
    msg.push_str(&format!(
        "add to {} (then restart the agent):\n{}",
        PathBuf::from("/").join(agent::AGENT_PROPERTIES).display(),
        install::properties_lines(&hooks)
    ));
    print_stdout(&msg)
}
