//! `shardseal quoting-agent`: the software TEE's quoting agent, as its own process.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use shardseal_attestation::{
    KeyOrigin, PlatformKey, QuotingAgent, bind_agent_socket, public_key_path,
};

/// Run the software TEE's quoting agent: it measures each process that connects to its
/// socket (SHA-256 of /proc/<pid>/exe) and signs a quote with the platform key. A
/// simulation of a hardware root of trust for development and CI: anyone with root on this
/// host can forge quotes.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  shardseal quoting-agent --socket state/agent/agent.sock --key state/agent/platform.key"
)]
pub(crate) struct QuotingAgentArgs {
    /// Unix socket to listen on. Put it in a directory only the agent and the functions can
    /// reach (e.g. /run/shardseal/).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Platform key file (Ed25519 seed, mode 0600). Loaded if it exists, created if not;
    /// its public key is written to FILE.pub for verifiers to pin.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Create a new platform key and fail if FILE already exists.
    #[arg(long)]
    init: bool,

    /// Permission bits of the socket, in octal: 600 admits only the agent's user, 660 also
    /// its group (run functions in that group and the agent as its own user).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,

    /// Measure this executable at start (repeatable): the function binary this host runs,
    /// so that its first function does not wait for the hash. A file that changes
    /// afterwards is measured again on its first quote, as any new file.
    #[arg(long, value_name = "FILE")]
    prewarm: Vec<PathBuf>,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not octal permission bits such as 600 or 660"
        )),
    }
}

/// Reading `/proc/<pid>/exe` of a non-dumpable process needs `CAP_SYS_PTRACE`; ShardSeal
/// functions make themselves non-dumpable, so an agent without it refuses them all.
fn can_measure_non_dumpable_processes() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(caps.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

pub(crate) fn run(args: QuotingAgentArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();

    let (key, origin) = if args.init {
        let key = PlatformKey::create_file(&args.key)
            .with_context(|| format!("cannot create the platform key {}", args.key.display()))?;
        (key, KeyOrigin::Created)
    } else {
        PlatformKey::load_or_create_file(&args.key)
            .with_context(|| format!("cannot load the platform key {}", args.key.display()))?
    };
    match origin {
        KeyOrigin::Created => println!("created a new platform key in {}", args.key.display()),
        KeyOrigin::Loaded => println!("loaded the platform key from {}", args.key.display()),
    }
    println!("platform public key: {}", key.public_key());
    println!(
        "public key file: {} (pin it under trusted_roots.software_tee in the release policy)",
        public_key_path(&args.key).display()
    );

    if !can_measure_non_dumpable_processes() {
        eprintln!(
            "warning: this agent lacks CAP_SYS_PTRACE, so it cannot measure functions that made \
             themselves non-dumpable (PR_SET_DUMPABLE=0); run it as root or grant it the \
             capability"
        );
    }

    let agent = QuotingAgent::new(key);
    for program in &args.prewarm {
        let started = std::time::Instant::now();
        // A function binary that is missing now may be installed later: its first quote
        // measures it then.
        match agent.prewarm(program) {
            Ok(measurement) => tracing::info!(
                file = %program.display(), %measurement,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "executable measured ahead of its first quote"
            ),
            Err(e) => {
                tracing::warn!(file = %program.display(), error = %e, "executable not measured ahead")
            }
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot listen for SIGTERM")?;
        let (listener, socket) = bind_agent_socket(&args.socket, args.socket_mode)
            .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
        println!("listening on {}", socket.path().display());
        // The supervisor of `shardseal up` waits for this line.
        println!("SHARDSEAL_READY {}", socket.path().display());
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            println!("stopping");
        };
        agent.run(listener, shutdown).await;
        // Dropping the socket guard removes the socket file.
        drop(socket);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("888").is_err());
        assert!(parse_mode("7777").is_err());
    }
}
