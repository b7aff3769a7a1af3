//! `gpupass-hook`: gpupass's hook mode (`transform`, `hook qemu …`, `usage`, `install-hook`,
//! `cloudstack discover/install`) in a binary that does not link libvirt. libvirt waits for its
//! hook on every start and stop, and loading libvirt's ~50 shared libraries costs ~12 ms before
//! `main` even runs; this binary shares all its code with `gpupass` and links only libc.

use std::process::ExitCode;

use clap::Parser;

use gpupass::hook::cli::{Dirs, HookCommand};

/// gpupass hook mode, without libvirt linked (what `gpupass install-hook` installs).
#[derive(Debug, Parser)]
#[command(name = "gpupass-hook", version)]
struct Cli {
    #[command(flatten)]
    dirs: Dirs,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: HookCommand,
}

fn main() -> ExitCode {
    let cli = match gpupass::hook::cli::parse_args::<Cli>("gpupass-hook", |c| &mut c.dirs) {
        Ok(c) => c,
        Err(code) => return code,
    };
    gpupass::observability::init(cli.verbose, cli.dirs.log_file.as_deref());
    gpupass::hook::cli::run(&cli.dirs, &cli.command)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
