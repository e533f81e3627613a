//! Prints what one hop of the data path costs on this machine, layer by layer:
//! `cargo run --release -p shardseal-proto --example hop_latency [-- KIB ...]`.
//!
//! A child process serves three listeners; the parent calls each in turn, interleaved, so all
//! three meet the same machine:
//! - **tcp**: the payload over a plain TCP connection, and the reply back (the kernel's share);
//! - **h2c**: a `StageFunction.Process` call over plaintext HTTP/2 (tonic, hyper, h2, prost);
//! - **tls**: the same call over the mutual TLS every ShardSeal link uses (rustls with ring).
//!
//! Each is timed with a small reply after a large request (the coordinator sending a sealed
//! activation to a function) and with a large reply after a small request (a function
//! answering with one). The sizes default to 784 KiB, the activation crossing ResNet-50's
//! 2-stage cut; pass others in KiB. Payloads are opaque bytes, as sealed ones are.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse, Sealed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SMALL: usize = 4 << 10;
const WARMUP: usize = 20;
const ROUNDS: usize = 200;
/// Between calls, so each one starts from idle cores, as a request at concurrency 1 does.
const PAUSE: Duration = Duration::from_millis(2);
const LIMIT: usize = 256 << 20;

/// Answers `Process` with a sealed payload of as many bytes as the request's `stage` says.
struct Reply;

#[tonic::async_trait]
impl StageFunction for Reply {
    async fn process(
        &self,
        request: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let len = request.into_inner().stage as usize;
        Ok(Response::new(ProcessResponse {
            activations: Some(Sealed {
                enc: Bytes::new(),
                ciphertext: Bytes::from(vec![7u8; len]),
            }),
            timing: None,
        }))
    }

    async fn ready(&self, _: Request<ReadyRequest>) -> Result<Response<ReadyResponse>, Status> {
        Ok(Response::new(ReadyResponse::default()))
    }
}

fn grpc_server() -> StageFunctionServer<Reply> {
    StageFunctionServer::new(Reply)
        .max_decoding_message_size(LIMIT)
        .max_encoding_message_size(LIMIT)
}

/// Reads `[request length, reply length]` as two little-endian u32, then the request, and
/// writes the reply; until the peer closes.
async fn raw_echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut header = [0u8; 8];
    let mut request = Vec::new();
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let [a, b, c, d, e, f, g, h] = header;
        request.resize(u32::from_le_bytes([a, b, c, d]) as usize, 0);
        stream.read_exact(&mut request).await?;
        let reply = vec![7u8; u32::from_le_bytes([e, f, g, h]) as usize];
        stream.write_all(&reply).await?;
    }
}

async fn serve(pki_dir: &Path) -> Result<(), BoxError> {
    let pki = Pki::open(pki_dir)?;
    let raw = TcpListener::bind("127.0.0.1:0").await?;
    let h2c = TcpListener::bind("127.0.0.1:0").await?;
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{} {} {}",
        raw.local_addr()?,
        h2c.local_addr()?,
        tls.local_addr()?
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = raw.accept().await {
            tokio::spawn(raw_echo(stream));
        }
    });
    let plaintext = Server::builder()
        .add_service(grpc_server())
        .serve_with_incoming(TcpIncoming::from(h2c).with_nodelay(Some(true)));
    let sealed = Server::builder()
        .tls_config(pki.server_config(Role::Function)?)?
        .add_service(grpc_server())
        .serve_with_incoming(TcpIncoming::from(tls).with_nodelay(Some(true)));
    tokio::try_join!(plaintext, sealed)?;
    Ok(())
}

enum Link {
    Tcp(TcpStream),
    Grpc(StageFunctionClient<Channel>),
}

impl Link {
    async fn call(&mut self, request: &Bytes, reply: usize) -> Result<(), BoxError> {
        match self {
            Link::Tcp(stream) => {
                let mut header = [0u8; 8];
                header[..4].copy_from_slice(&u32::try_from(request.len())?.to_le_bytes());
                header[4..].copy_from_slice(&u32::try_from(reply)?.to_le_bytes());
                stream.write_all(&header).await?;
                stream.write_all(request).await?;
                let mut answer = vec![0u8; reply];
                stream.read_exact(&mut answer).await?;
            }
            Link::Grpc(client) => {
                let answer = client
                    .process(ProcessRequest {
                        header: None,
                        stage: u32::try_from(reply)?,
                        activations: Some(Sealed {
                            enc: Bytes::new(),
                            ciphertext: request.clone(),
                        }),
                    })
                    .await?
                    .into_inner();
                let len = answer.activations.map_or(0, |s| s.ciphertext.len());
                if len != reply {
                    return Err(format!("a reply of {len} bytes, not {reply}").into());
                }
            }
        }
        Ok(())
    }
}

async fn grpc(endpoint: Endpoint) -> Result<Link, BoxError> {
    let channel = endpoint.tcp_nodelay(true).connect().await?;
    Ok(Link::Grpc(
        StageFunctionClient::new(channel)
            .max_decoding_message_size(LIMIT)
            .max_encoding_message_size(LIMIT),
    ))
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(Path::new(&args[1])).await;
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![784 << 10]
    } else {
        args.iter()
            .map(|a| a.parse::<usize>().map(|kib| kib << 10))
            .collect::<Result<_, _>>()?
    };

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg(dir.path().join("pki"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stdout), &mut line)
        .await?;
    let addrs: Vec<SocketAddr> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [raw, h2c, tls] = addrs[..] else {
        return Err(format!("the server printed {line:?}").into());
    };

    let tcp = TcpStream::connect(raw).await?;
    tcp.set_nodelay(true)?;
    let mut links = [
        ("tcp", Link::Tcp(tcp)),
        (
            "h2c",
            grpc(Endpoint::from_shared(format!("http://{h2c}"))?).await?,
        ),
        (
            "tls",
            grpc(
                Endpoint::from_shared(format!("https://{tls}"))?
                    .tls_config(pki.client_config(Role::Function, Some(Role::Coordinator))?)?,
            )
            .await?,
        ),
    ];

    println!("one call between two processes, {ROUNDS} rounds after {WARMUP} (ms: p50, p10-p90)");
    let mut cases = vec![(SMALL, SMALL)];
    for &size in &sizes {
        cases.push((size, SMALL));
        cases.push((SMALL, size));
    }
    let mut small_p50 = [0.0f64; 3];
    for (request_len, reply_len) in cases {
        let request = Bytes::from(vec![1u8; request_len]);
        let mut times = [(); 3].map(|()| Vec::with_capacity(ROUNDS));
        for round in 0..WARMUP + ROUNDS {
            for ((_, link), times) in links.iter_mut().zip(&mut times) {
                tokio::time::sleep(PAUSE).await;
                let start = Instant::now();
                link.call(&request, reply_len).await?;
                if round >= WARMUP {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let mut row = format!(
            "request {:>6} KiB, reply {:>6} KiB |",
            request_len >> 10,
            reply_len >> 10
        );
        for (i, ((name, _), times)) in links.iter().zip(&mut times).enumerate() {
            times.sort_by(f64::total_cmp);
            let p50 = percentile(times, 50);
            if (request_len, reply_len) == (SMALL, SMALL) {
                small_p50[i] = p50;
                row += &format!(
                    " {name} {p50:.3} ({:.3}-{:.3})",
                    percentile(times, 10),
                    percentile(times, 90)
                );
            } else {
                let extra = p50 - small_p50[i];
                let mib = (request_len.max(reply_len) as f64) / f64::from(1 << 20);
                row += &format!(
                    " {name} {p50:.3} ({:.3}-{:.3}; +{extra:.3}, {:.2} GB/s)",
                    percentile(times, 10),
                    percentile(times, 90),
                    mib * 1.048_576 / extra.max(1e-6),
                );
            }
        }
        println!("{row}");
    }
    child.kill().await?;
    Ok(())
}
