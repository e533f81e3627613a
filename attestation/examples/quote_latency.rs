//! Prints how long the software TEE takes to quote and verify, in-process:
//! `cargo run -p shardseal-attestation --release --example quote_latency`.
//!
//! Most of a quote is hashing the caller's executable (this example's own binary), so the
//! figures scale with its size; they are reported per MiB too.

use std::time::{Duration, Instant};

use shardseal_attestation::{
    NonceRegistry, PlatformKey, QuotingAgent, ReportData, SoftwareTeeVerifier, Verifier,
    bind_agent_socket, request_quote,
};

const SEQUENTIAL: u32 = 100;
const CONCURRENT: u32 = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("agent.sock");
    let key = PlatformKey::generate()?;
    let verifier = SoftwareTeeVerifier::new(vec![key.public_key()]);
    let (listener, _socket) = bind_agent_socket(&socket_path, 0o600)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(QuotingAgent::new(key).run(listener, async {
        let _ = stopped.await;
    }));

    let exe_mib = std::fs::metadata(std::env::current_exe()?)?.len() as f64 / (1024.0 * 1024.0);
    let nonces = NonceRegistry::new();

    let mut quoting = Duration::ZERO;
    let mut verifying = Duration::ZERO;
    for _ in 0..SEQUENTIAL {
        let expected = ReportData::bind(&[1; 32], &nonces.issue()?);
        let start = Instant::now();
        let evidence = request_quote(&socket_path, &expected).await?;
        quoting += start.elapsed();
        let start = Instant::now();
        verifier.verify(&evidence, &expected)?;
        verifying += start.elapsed();
    }
    let per_quote = quoting / SEQUENTIAL;
    println!("executable measured: {exe_mib:.1} MiB");
    println!(
        "sequential quote: {:.2} ms each ({:.2} ms per MiB measured), verify: {:.1} µs each",
        per_quote.as_secs_f64() * 1e3,
        per_quote.as_secs_f64() * 1e3 / exe_mib,
        (verifying / SEQUENTIAL).as_secs_f64() * 1e6,
    );

    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENT {
        let socket_path = socket_path.clone();
        let expected = ReportData::bind(&[2; 32], &nonces.issue()?);
        tasks.push(tokio::spawn(async move {
            request_quote(&socket_path, &expected).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = start.elapsed();
    println!(
        "{CONCURRENT} concurrent quotes: {:.0} ms wall, {:.1} quotes/s",
        wall.as_secs_f64() * 1e3,
        f64::from(CONCURRENT) / wall.as_secs_f64()
    );

    let _ = stop.send(());
    agent.await?;
    Ok(())
}
