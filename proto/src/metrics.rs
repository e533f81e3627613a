//! Prometheus metrics: a small registry of atomic counters, gauges and histograms, and
//! the plain-HTTP endpoint (`GET /metrics`, text exposition format 0.0.4) every ShardSeal
//! service can serve on a listener of its own.
//!
//! ```text
//!   code ──inc / observe──▶ Registry (process-wide, atomics) ◀──render── GET /metrics
//! ```
//!
//! Labels carry names only (model id, stage index, gRPC code, outcome): never a tensor
//! value, a key or a request's content. The endpoint is off unless a service is given a
//! listen address, and [`bind`] refuses a non-loopback address unless remote scraping is
//! explicitly allowed, since metrics reveal traffic volume and timing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The listen address is not `IP:PORT`.
    #[error("metrics listen address {0:?} is not IP:PORT")]
    BadAddress(String),
    /// A non-loopback address was given without allowing remote scrapes.
    #[error(
        "refusing to serve metrics on the non-loopback address {0}: pass --metrics-allow-remote to expose them"
    )]
    RemoteNotAllowed(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Latency buckets, in seconds: 1 ms to 60 s (cold starts and debug builds included).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts of observations per bucket, their sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; one more than `bounds` (the `+Inf` bucket).
    buckets: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation (seconds, for the latency histograms).
    pub fn observe(&self, value: f64) {
        let index = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Clone)]
enum Series {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: &'static str,
    /// Label names, in the order of every series' values.
    label_names: Vec<&'static str>,
    series: BTreeMap<Vec<String>, Series>,
}

/// A set of metric families, rendered in the Prometheus text format.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

/// The process-wide registry every service records into and its endpoint renders.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::default)
}

impl Registry {
    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &[(&'static str, &str)],
        make: impl FnOnce() -> Series,
    ) -> Series {
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let family = families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            label_names: labels.iter().map(|(n, _)| *n).collect(),
            series: BTreeMap::new(),
        });
        let values: Vec<String> = labels.iter().map(|(_, v)| (*v).to_owned()).collect();
        family.series.entry(values).or_insert_with(make).clone()
    }

    /// The counter `name` with these label values (created at zero on first use).
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Counter> {
        match self.series(name, help, "counter", labels, || {
            Series::Counter(Arc::default())
        }) {
            Series::Counter(c) => c,
            // A name registered as another type: count into a detached counter rather
            // than panic in a server (a programming error, caught by the unit tests).
            _ => Arc::default(),
        }
    }

    /// The gauge `name` with these label values.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Gauge> {
        match self.series(
            name,
            help,
            "gauge",
            labels,
            || Series::Gauge(Arc::default()),
        ) {
            Series::Gauge(g) => g,
            _ => Arc::default(),
        }
    }

    /// The histogram `name` with these label values and bucket bounds.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
        labels: &[(&'static str, &str)],
    ) -> Arc<Histogram> {
        match self.series(name, help, "histogram", labels, || {
            Series::Histogram(Arc::new(Histogram::new(bounds)))
        }) {
            Series::Histogram(h) => h,
            _ => Arc::new(Histogram::new(bounds)),
        }
    }

    /// Every family in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (values, series) in &family.series {
                let labels = label_text(&family.label_names, values, None);
                match series {
                    Series::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.get());
                    }
                    Series::Gauge(g) => {
                        let _ = writeln!(out, "{name}{labels} {}", g.get());
                    }
                    Series::Histogram(h) => {
                        let mut cumulative = 0;
                        for (i, bucket) in h.buckets.iter().enumerate() {
                            cumulative += bucket.load(Ordering::Relaxed);
                            let le = h
                                .bounds
                                .get(i)
                                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                            let labels = label_text(&family.label_names, values, Some(&le));
                            let _ = writeln!(out, "{name}_bucket{labels} {cumulative}");
                        }
                        let _ = writeln!(out, "{name}_sum{labels} {}", h.sum());
                        let _ = writeln!(out, "{name}_count{labels} {}", h.count());
                    }
                }
            }
        }
        out
    }
}

/// `{a="x",b="y"}` (empty without labels), with `le` last for histogram buckets.
fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The canonical upper-case name of a gRPC code (`OK`, `UNAVAILABLE`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Binds the metrics listener on `addr` (`IP:PORT`; port 0 picks a free port), refusing a
/// non-loopback address unless `allow_remote`.
pub async fn bind(addr: &str, allow_remote: bool) -> Result<TcpListener, MetricsError> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| MetricsError::BadAddress(addr.to_owned()))?;
    if !parsed.ip().is_loopback() && !allow_remote {
        return Err(MetricsError::RemoteNotAllowed(parsed));
    }
    TcpListener::bind(parsed)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: parsed,
            source,
        })
}

/// The largest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` over plain HTTP/1.1 on `listener` until `shutdown` resolves. Each
/// scrape's body is what `render` returns then (so gauges can be refreshed at scrape time).
/// One response per connection (`Connection: close`).
pub async fn serve<R, F>(listener: TcpListener, render: R, shutdown: impl Future<Output = ()>)
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let render = render.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, render).await;
                });
            }
        }
    }
}

async fn answer<R, F>(mut stream: TcpStream, render: R) -> std::io::Result<()>
where
    R: Fn() -> F,
    F: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    if !matches!(complete, Ok(Ok(true))) {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            "bad request\n",
        )
        .await;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let body = render().await;
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let r = Registry::default();
        r.counter("t_total", "Things.", &[("model", "m"), ("code", "OK")])
            .inc();
        r.counter("t_total", "Things.", &[("model", "m"), ("code", "OK")])
            .inc();
        r.gauge("g", "A gauge.", &[]).set(-3);
        let h = r.histogram("h_seconds", "Latency.", &[0.1, 1.0], &[("stage", "0")]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let text = r.render();
        assert!(text.contains("# TYPE t_total counter\n"), "{text}");
        assert!(
            text.contains("t_total{model=\"m\",code=\"OK\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("g -3\n"), "{text}");
        assert!(
            text.contains("h_seconds_bucket{stage=\"0\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{stage=\"0\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{stage=\"0\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("h_seconds_sum{stage=\"0\"} 5.55\n"), "{text}");
        assert!(text.contains("h_seconds_count{stage=\"0\"} 3\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::default();
        r.counter("c_total", "C.", &[("model", "a\"b\\c\nd")]).inc();
        assert!(r.render().contains(r#"c_total{model="a\"b\\c\nd"} 1"#));
    }

    #[test]
    fn a_name_reused_with_another_type_does_not_panic() {
        let r = Registry::default();
        r.counter("x", "X.", &[]).inc();
        r.gauge("x", "X.", &[]).set(5);
        assert!(r.render().contains("x 1\n"));
    }

    #[tokio::test]
    async fn refuses_remote_addresses_unless_allowed() {
        assert!(matches!(
            bind("0.0.0.0:0", false).await,
            Err(MetricsError::RemoteNotAllowed(_))
        ));
        assert!(matches!(
            bind("localhost", false).await,
            Err(MetricsError::BadAddress(_))
        ));
        bind("127.0.0.1:0", false).await.unwrap();
        bind("0.0.0.0:0", true).await.unwrap();
    }

    #[tokio::test]
    async fn serves_get_metrics_only() {
        let listener = bind("127.0.0.1:0", false).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, || async { "up 1\n".to_owned() }, async {
            let _ = stopped.await;
        }));
        let get = |request: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        let missing = get("GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get("POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
